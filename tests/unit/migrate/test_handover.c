// SPDX-License-Identifier: MIT
/*
 * The migration state machines against a scripted peer, over a real unix
 * socket: each test plays the other side byte for byte and fails it at one
 * chosen moment, then checks who may run the guest (docs/handover.md).
 *
 * Source tests: the test is the destination. It reads the stream with the
 * library's own loader, acknowledges SYNC marks, and at EOS answers (or
 * not) as the script says. Destination tests: the test is the source; it
 * writes the stream with the library's writer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <vmig/vmig.h>

#include "stream/stream.h"

#define NPAGES 64
#define RAM_SIZE (NPAGES * VMIG_PAGE_SIZE)

/* ---- a fake VM -------------------------------------------------------- */

struct fake_vm {
	bool running; /* atomics: the test reads them while libvmig runs */
	unsigned stops, starts;
	int running_when_ended; /* -1 until the status became failed/cancelled */
	uint8_t *ram;
	size_t size; /* of ram */
	vmig_session *s;
	void (*at_stop)(struct fake_vm *vm); /* the vCPUs' last moment, or NULL */
};

static int fake_stop(void *opaque)
{
	struct fake_vm *vm = opaque;

	if (vm->at_stop)
		vm->at_stop(vm);
	__atomic_store_n(&vm->running, false, __ATOMIC_RELEASE);
	__atomic_add_fetch(&vm->stops, 1, __ATOMIC_RELEASE);
	return 0;
}

static int fake_start(void *opaque)
{
	struct fake_vm *vm = opaque;

	__atomic_store_n(&vm->running, true, __ATOMIC_RELEASE);
	__atomic_add_fetch(&vm->starts, 1, __ATOMIC_RELEASE);
	return 0;
}

static bool fake_running(void *opaque)
{
	struct fake_vm *vm = opaque;

	return __atomic_load_n(&vm->running, __ATOMIC_ACQUIRE);
}

static int fake_save(void *opaque, void *buf, size_t cap, size_t *len)
{
	memcpy(buf, "state", 5);
	*len = 5;
	return 0;
}

static int fake_load(void *opaque, const void *buf, size_t len)
{
	return len == 5 && !memcmp(buf, "state", 5) ? 0 : -EINVAL;
}

/* Whether the vCPUs ran at the moment the migration was reported over:
 * whoever reacts to "failed" must find the VM as it will stay. */
static void fake_event(void *opaque, const struct vmig_event *ev)
{
	struct fake_vm *vm = opaque;

	if (ev->type == VMIG_EVENT_STATUS &&
	    (ev->status == VMIG_STATUS_FAILED || ev->status == VMIG_STATUS_CANCELLED))
		__atomic_store_n(&vm->running_when_ended, fake_running(vm), __ATOMIC_RELEASE);
}

static const struct vmig_vm_ops fake_ops = {
	.event = fake_event,
	.stop = fake_stop,
	.start = fake_start,
	.running = fake_running,
	.save_state = fake_save,
	.load_state = fake_load,
};

static vmig_session *new_session_sized(struct fake_vm *vm, bool running, size_t size)
{
	vmig_session *s;
	struct vmig_ram_block blk = {.name = "pc.ram", .size = size, .fd = -1};

	memset(vm, 0, sizeof(*vm));
	vm->running = running;
	vm->running_when_ended = -1;
	vm->size = size;
	vm->ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(vm->ram != MAP_FAILED);
	for (size_t i = 0; i < size / VMIG_PAGE_SIZE; i++)
		memset(vm->ram + i * VMIG_PAGE_SIZE, (int)(i + 1), VMIG_PAGE_SIZE);
	assert_int_equal(vmig_session_new(&s, &fake_ops, vm), 0);
	blk.host = vm->ram;
	assert_int_equal(vmig_ram_block_add(s, &blk), 0);
	return s;
}

static vmig_session *new_session(struct fake_vm *vm, bool running)
{
	return new_session_sized(vm, running, RAM_SIZE);
}

static void free_session(vmig_session *s, struct fake_vm *vm)
{
	vmig_session_free(s);
	munmap(vm->ram, vm->size);
}

/* Wait for one of the end states; returns the final statistics. */
static struct vmig_stats wait_end(vmig_session *s, enum vmig_status also)
{
	struct vmig_stats st;

	for (int i = 0; i < 10000; i++) {
		vmig_query(s, &st);
		if (st.status == VMIG_STATUS_COMPLETED || st.status == VMIG_STATUS_FAILED ||
		    st.status == VMIG_STATUS_CANCELLED || st.status == also)
			return st;
		usleep(1000);
	}
	fail_msg("migration did not end: status %s", vmig_status_name(st.status));
	return st;
}

/* ---- the test as destination ------------------------------------------ */

static void sock_path(char *path, size_t len, const char *tag)
{
	snprintf(path, len, "/tmp/vmig-ut-%d-%s.sock", (int)getpid(), tag);
	unlink(path);
}

static int listen_unix(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	assert_true(fd >= 0);
	assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(fd, 4), 0);
	return fd;
}

static void send_rp(int fd, uint8_t type, const void *payload, uint32_t len)
{
	struct vmig_wire_rec rec = {.type = type, .len = len};

	assert_int_equal(vmig__write_full(fd, &rec, sizeof(rec)), 0);
	if (len)
		assert_int_equal(vmig__write_full(fd, payload, len), 0);
}

enum at_eos { REPLY_RESUMED, REPLY_ERROR, REPLY_NOTHING_CLOSE, REPLY_NOTHING_CANCEL };

struct dest_script {
	int lfd;
	bool postcopy;           /* an urgent channel; the end is POSTCOPY_RUN */
	int held_fd;             /* post-copy: the main fd, closed by the test */
	bool go;                 /* atomic, post-copy: the switch was asked for */
	enum at_eos at_eos;
	bool close_after_blocks; /* fail before the commit point */
	vmig_session *src;       /* for REPLY_NOTHING_CANCEL */
	const unsigned *calls;	 /* atomic; if set, the reply waits until it grew */
	bool saw_eos;
	/* pre-copy: the source's postcopy-ram capability, a hook at its stop,
	 * and its RAM, which the destination's must equal at the end */
	bool postcopy_cap;
	void (*at_stop)(struct fake_vm *vm);
	const uint8_t *expect;
	bool ram_equal;
};

static int discard_nothing(void *opaque, unsigned block, uint64_t first, uint64_t npages)
{
	return 0;
}

static int place_nothing(void *opaque, unsigned block, uint64_t first, uint32_t npages,
			 const uint8_t *buf)
{
	return 0;
}

/* Play the destination of one migration, to its end record. */
static void *fake_dest(void *arg)
{
	struct dest_script *sc = arg;
	struct vmig__reader *r = malloc(sizeof(*r));
	uint8_t *ram = calloc(NPAGES, VMIG_PAGE_SIZE);
	uint64_t hash[NPAGES], received[1] = {0}, zero[1] = {0};
	struct vmig__load_block blk = {.host = ram, .size = RAM_SIZE, .npages = NPAGES,
				       .page_hash = hash, .received = received, .zero = zero};
	struct vmig__err err = {{0}};
	struct vmig__loader l = {.r = r, .blocks = &blk, .nblocks = 1, .err = &err};
	int fd = accept4(sc->lfd, NULL, NULL, SOCK_CLOEXEC);
	int ufd = sc->postcopy ? accept4(sc->lfd, NULL, NULL, SOCK_CLOEXEC) : -1;
	uint8_t type;

	strcpy(blk.name, "pc.ram");
	for (unsigned i = 0; i < NPAGES; i++)
		hash[i] = vmig__zero_page_hash();
	assert_true(fd >= 0);
	vmig__reader_init_chan(r, vmig__chan_from_fd(dup(fd)));
	assert_int_equal(vmig__load_preamble(&l), 0);
	l.hooks.discard = discard_nothing;
	l.hooks.place = place_nothing;
	while (!vmig__load_record(&l, &type)) {
		if (type == VMIG_REC_BLOCKS && sc->close_after_blocks)
			break;
		if (type == VMIG_REC_SYNC) {
			struct vmig_wire_sync_ack ack = {.round = l.last_round};

			/* Post-copy: no round is over before the switch was asked
			 * for, so pre-copy cannot end first. */
			while (sc->postcopy && !__atomic_load_n(&sc->go, __ATOMIC_ACQUIRE))
				usleep(1000);
			send_rp(fd, VMIG_RP_SYNC_ACK, &ack, sizeof(ack));
		}
		if (l.eos || l.run) {
			sc->saw_eos = true;
			break;
		}
	}
	if (sc->saw_eos) {
		struct vmig_wire_resumed res = {.load_us = 1};

		if (!sc->postcopy)
			assert_int_equal(vmig__load_verify(&l), 0);
		if (sc->expect)
			sc->ram_equal = !memcmp(ram, sc->expect, RAM_SIZE);
		if (sc->calls) {
			/* The source waits for this reply: let the other thread's
			 * calls happen while the migration is still on (bounded). */
			unsigned from = __atomic_load_n(sc->calls, __ATOMIC_ACQUIRE);

			for (int i = 0;
			     i < 10000 && __atomic_load_n(sc->calls, __ATOMIC_ACQUIRE) < from + 100;
			     i++)
				usleep(1000);
		}
		if (sc->at_eos == REPLY_RESUMED)
			send_rp(fd, VMIG_RP_RESUMED, &res, sizeof(res));
		else if (sc->at_eos == REPLY_ERROR)
			send_rp(fd, VMIG_RP_ERROR, "refused", 7);
		else if (sc->at_eos == REPLY_NOTHING_CANCEL)
			assert_int_equal(vmig_cancel(sc->src), 0);
	}
	if (sc->at_eos == REPLY_NOTHING_CANCEL) { /* hold the line until the source gives up */
		char c;

		while (read(fd, &c, 1) > 0)
			;
	}
	if (sc->postcopy) {
		/* Ends both ways at once, after what was sent: closing with
		 * unread data would reset the link and could drop RESUMED. */
		shutdown(fd, SHUT_RDWR);
		sc->held_fd = fd;
	} else {
		close(fd);
	}
	if (ufd >= 0)
		close(ufd);
	vmig__chan_free(r->c);
	vmig__loader_release(&l);
	free(ram);
	free(r);
	return NULL;
}

/* Run one outgoing migration against the script; returns its end state. */
static struct vmig_stats run_source(struct dest_script *sc, struct fake_vm *vm, bool pause,
				    vmig_session **keep, pthread_t *thread)
{
	char path[108], uri[120];
	pthread_t t;
	vmig_session *s = new_session(vm, true);
	struct vmig_stats st;

	sock_path(path, sizeof(path), "src");
	snprintf(uri, sizeof(uri), "unix:%s", path);
	sc->lfd = listen_unix(path);
	sc->src = s;
	vm->s = s;
	vm->at_stop = sc->at_stop;
	if (sc->expect)
		sc->expect = vm->ram;
	if (sc->postcopy_cap)
		assert_int_equal(vmig_capability_set(s, "postcopy-ram", true), 0);
	if (pause)
		assert_int_equal(vmig_capability_set(s, "pause-before-switchover", true), 0);
	assert_int_equal(pthread_create(&t, NULL, fake_dest, sc), 0);
	assert_int_equal(vmig_migrate(s, uri), 0);
	st = wait_end(s, pause ? VMIG_STATUS_PRE_SWITCHOVER : VMIG_STATUS_NONE);
	if (pause) { /* the caller goes on, then joins the destination */
		*keep = s;
		*thread = t;
		close(sc->lfd);
		unlink(path);
		return st;
	}
	pthread_join(t, NULL);
	close(sc->lfd);
	unlink(path);
	free_session(s, vm);
	return st;
}

static void test_resumed_completes(void **state)
{
	struct dest_script sc = {.at_eos = REPLY_RESUMED};
	struct fake_vm vm;
	struct vmig_stats st = run_source(&sc, &vm, false, NULL, NULL);

	assert_int_equal(st.status, VMIG_STATUS_COMPLETED);
	assert_int_equal(vm.stops, 1);
	assert_int_equal(vm.starts, 0);
	assert_false(st.handover_unknown);
}

/* The guest's last writes, in two runs apart, then a post-copy request
 * that lands while the source stops it (status still active). */
static void write_then_ask_postcopy(struct fake_vm *vm)
{
	memset(vm->ram + 1 * VMIG_PAGE_SIZE, 0xa1, VMIG_PAGE_SIZE);
	memset(vm->ram + 3 * VMIG_PAGE_SIZE, 0xa3, VMIG_PAGE_SIZE);
	assert_int_equal(vmig_start_postcopy(vm->s), 0);
}

/*
 * The final pre-copy round is decided: a post-copy request that comes now
 * must not cut it short. It did: the last round stopped after its first
 * run, the rest of the dirty pages were never sent, and since the digest
 * covers what was sent, the destination ran on stale pages unawares.
 */
static void test_postcopy_request_at_stop_sends_all(void **state)
{
	struct dest_script sc = {.at_eos = REPLY_RESUMED,
				 .postcopy_cap = true,
				 .at_stop = write_then_ask_postcopy,
				 .expect = (const uint8_t *)1};
	struct fake_vm vm;
	struct vmig_stats st = run_source(&sc, &vm, false, NULL, NULL);

	assert_int_equal(st.status, VMIG_STATUS_COMPLETED);
	assert_true(sc.saw_eos);
	assert_true(sc.ram_equal);
}

static void test_lost_after_commit_stays_stopped(void **state)
{
	struct dest_script sc = {.at_eos = REPLY_NOTHING_CLOSE};
	struct fake_vm vm;
	struct vmig_stats st = run_source(&sc, &vm, false, NULL, NULL);

	assert_true(sc.saw_eos);
	assert_int_equal(st.status, VMIG_STATUS_FAILED);
	assert_true(st.handover_unknown);
	assert_non_null(strstr(st.error_desc, "may be running"));
	assert_int_equal(vm.stops, 1);
	assert_int_equal(vm.starts, 0);
	assert_false(vm.running);
}

static void test_cancel_after_commit_stays_stopped(void **state)
{
	struct dest_script sc = {.at_eos = REPLY_NOTHING_CANCEL};
	struct fake_vm vm;
	struct vmig_stats st = run_source(&sc, &vm, false, NULL, NULL);

	assert_int_equal(st.status, VMIG_STATUS_FAILED);
	assert_true(st.handover_unknown);
	assert_int_equal(vm.starts, 0);
	assert_false(vm.running);
}

static void test_refused_resumes(void **state)
{
	struct dest_script sc = {.at_eos = REPLY_ERROR};
	struct fake_vm vm;
	struct vmig_stats st = run_source(&sc, &vm, false, NULL, NULL);

	assert_int_equal(st.status, VMIG_STATUS_FAILED);
	assert_false(st.handover_unknown);
	if (!strstr(st.error_desc, "refused"))
		fail_msg("error-desc: %s", st.error_desc);
	assert_int_equal(vm.starts, 1);
	assert_true(vm.running);
	assert_int_equal(vm.running_when_ended, 1);
}

static void test_lost_before_commit_runs_on(void **state)
{
	struct dest_script sc = {.close_after_blocks = true};
	struct fake_vm vm;
	struct vmig_stats st = run_source(&sc, &vm, false, NULL, NULL);

	assert_int_equal(st.status, VMIG_STATUS_FAILED);
	assert_false(st.handover_unknown);
	assert_true(vm.running);
	assert_int_equal(vm.starts, vm.stops);
	assert_int_equal(vm.running_when_ended, 1);
}

static void test_pause_before_switchover(void **state)
{
	for (int cancel = 0; cancel < 2; cancel++) {
		struct dest_script sc = {.at_eos = REPLY_RESUMED};
		struct fake_vm vm;
		vmig_session *s = NULL;
		pthread_t t;
		struct vmig_stats st = run_source(&sc, &vm, true, &s, &t);

		assert_int_equal(st.status, VMIG_STATUS_PRE_SWITCHOVER);
		assert_false(vm.running);
		assert_int_equal(vmig_continue(s, VMIG_STATUS_ACTIVE), -EINVAL);
		if (cancel)
			assert_int_equal(vmig_cancel(s), 0);
		else
			assert_int_equal(vmig_continue(s, VMIG_STATUS_PRE_SWITCHOVER), 0);
		st = wait_end(s, VMIG_STATUS_NONE);
		pthread_join(t, NULL);
		assert_int_equal(st.status, cancel ? VMIG_STATUS_CANCELLED : VMIG_STATUS_COMPLETED);
		assert_int_equal(vm.running, cancel);
		free_session(s, &vm);
	}
}

/*
 * Post-copy: the link dies right after POSTCOPY_RUN. If the destination
 * had said it runs, the source must never give up (cancel refused); if it
 * had not, the outcome is unknown, and a cancel gives up with the vCPUs
 * left stopped, for the operator to start exactly one side.
 */
/* ---- post-copy: the digest after page requests -------------------------- */

#define BIG_PAGES 16384 /* 64 MiB */
/* Requests of 64 pages for the last 40 MiB: more than the library's socket
 * buffers (4 MiB asked, twice that granted) hold unread. */
#define ASKED_RUNS 160

struct held_script {
	int lfd;
	bool go; /* atomic: post-copy was asked for */
	struct fake_vm *vm;
	uint64_t digest, want;
	bool saw_digest;
};

/* The guest's last writes: every page changes, so every page is dirty at
 * the switch and each old hash is stale. */
static void rewrite_all(struct fake_vm *vm)
{
	for (size_t i = 0; i < vm->size / VMIG_PAGE_SIZE; i++)
		memset(vm->ram + i * VMIG_PAGE_SIZE, (int)(0x80 + i % 64), VMIG_PAGE_SIZE);
}

static void *drain_later(void *arg)
{
	int *ufd = arg;
	char buf[65536];

	usleep(300000);
	while (read(*ufd, buf, sizeof(buf)) > 0)
		;
	return NULL;
}

/* Play a post-copy destination that asks for the last pages at once and
 * reads the answers on the urgent connection only 300 ms later. */
static void *held_dest(void *arg)
{
	struct held_script *sc = arg;
	struct vmig__reader *r = malloc(sizeof(*r));
	uint8_t *ram = calloc(BIG_PAGES, VMIG_PAGE_SIZE);
	uint64_t *hash = calloc(BIG_PAGES, sizeof(uint64_t));
	uint64_t *received = calloc(BIG_PAGES / 64, 8), *zero = calloc(BIG_PAGES / 64, 8);
	struct vmig__load_block blk = {.host = ram,
				       .size = (uint64_t)BIG_PAGES * VMIG_PAGE_SIZE,
				       .npages = BIG_PAGES,
				       .page_hash = hash,
				       .received = received,
				       .zero = zero};
	struct vmig__err err = {{0}};
	struct vmig__loader l = {.r = r, .blocks = &blk, .nblocks = 1, .err = &err};
	int fd = accept4(sc->lfd, NULL, NULL, SOCK_CLOEXEC);
	int ufd = accept4(sc->lfd, NULL, NULL, SOCK_CLOEXEC);
	struct vmig_wire_resumed res = {.load_us = 1};
	struct vmig_wire_pages req = {.block = 0, .npages = VMIG_REC_MAX_PAGES};
	uint64_t *hp, np = BIG_PAGES;
	pthread_t drain;
	uint8_t type;

	strcpy(blk.name, "pc.ram");
	l.bounce = malloc(VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE);
	assert_true(fd >= 0 && ufd >= 0);
	vmig__reader_init_chan(r, vmig__chan_from_fd(dup(fd)));
	assert_int_equal(vmig__load_preamble(&l), 0);
	l.hooks.discard = discard_nothing;
	l.hooks.place = place_nothing;
	while (!l.run) {
		assert_int_equal(vmig__load_record(&l, &type), 0);
		if (type == VMIG_REC_SYNC) {
			struct vmig_wire_sync_ack ack = {.round = l.last_round};

			while (!__atomic_load_n(&sc->go, __ATOMIC_ACQUIRE))
				usleep(1000);
			send_rp(fd, VMIG_RP_SYNC_ACK, &ack, sizeof(ack));
		}
	}
	l.postcopy = true;
	/* The requests right behind RESUMED: they claim their pages long
	 * before the push, which starts at the first page, gets there; one
	 * of them blocks in its write with its pages claimed. */
	send_rp(fd, VMIG_RP_RESUMED, &res, sizeof(res));
	for (unsigned k = 0; k < ASKED_RUNS; k++) {
		req.first = BIG_PAGES - (ASKED_RUNS - k) * VMIG_REC_MAX_PAGES;
		send_rp(fd, VMIG_RP_PAGE_REQ, &req, sizeof(req));
	}
	assert_int_equal(pthread_create(&drain, NULL, drain_later, &ufd), 0);
	while (!l.have_digest && !vmig__load_record(&l, &type))
		;
	sc->saw_digest = l.have_digest;
	sc->digest = l.digest.page_digest;
	/* RAM no longer changes: what every page's hash must be by now. */
	for (unsigned i = 0; i < BIG_PAGES; i++)
		hash[i] = vmig__page_hash(sc->vm->ram + (size_t)i * VMIG_PAGE_SIZE);
	hp = hash;
	sc->want = vmig__digest_of_hashes(&hp, &np, 1);
	send_rp(fd, VMIG_RP_COMPLETE, NULL, 0);
	shutdown(fd, SHUT_RDWR);
	shutdown(ufd, SHUT_RDWR);
	pthread_join(drain, NULL);
	close(ufd);
	close(fd);
	vmig__chan_free(r->c);
	vmig__loader_release(&l);
	free(l.bounce);
	free(ram);
	free(hash);
	free(received);
	free(zero);
	free(r);
	return NULL;
}

/*
 * A page request claims its pages, then writes them on the urgent channel,
 * and their hashes are taken by that write's flush. A destination slow to
 * read makes the write wait; the push meanwhile finds nothing left. The
 * digest must wait for the request: made before, it covered the old hashes
 * of the requested pages and a good migration failed on it.
 */
static void test_postcopy_digest_waits_for_requests(void **state)
{
	struct held_script sc = {0};
	struct fake_vm vm;
	vmig_session *s = new_session_sized(&vm, true, (size_t)BIG_PAGES * VMIG_PAGE_SIZE);
	char path[108], uri[120];
	struct vmig_stats st;
	pthread_t t;

	sock_path(path, sizeof(path), "held");
	snprintf(uri, sizeof(uri), "unix:%s", path);
	sc.lfd = listen_unix(path);
	sc.vm = &vm;
	vm.s = s;
	vm.at_stop = rewrite_all;
	assert_int_equal(vmig_capability_set(s, "postcopy-ram", true), 0);
	assert_int_equal(pthread_create(&t, NULL, held_dest, &sc), 0);
	assert_int_equal(vmig_migrate(s, uri), 0);
	assert_int_equal(vmig_start_postcopy(s), 0);
	__atomic_store_n(&sc.go, true, __ATOMIC_RELEASE);
	pthread_join(t, NULL);
	st = wait_end(s, VMIG_STATUS_NONE);
	assert_true(sc.saw_digest);
	if (sc.digest != sc.want)
		fail_msg("the digest covers hashes older than the pages sent");
	assert_int_equal(st.status, VMIG_STATUS_COMPLETED);
	close(sc.lfd);
	unlink(path);
	free_session(s, &vm);
}

static void test_postcopy_lost_at_switch(void **state)
{
	for (int resumed = 0; resumed < 2; resumed++) {
		struct dest_script sc = {.postcopy = true,
					 .at_eos = resumed ? REPLY_RESUMED : REPLY_NOTHING_CLOSE};
		struct fake_vm vm;
		vmig_session *s = new_session(&vm, true);
		char path[108], uri[120];
		struct vmig_stats st;
		pthread_t t;

		sock_path(path, sizeof(path), "pc-src");
		snprintf(uri, sizeof(uri), "unix:%s", path);
		sc.lfd = listen_unix(path);
		assert_int_equal(vmig_capability_set(s, "postcopy-ram", true), 0);
		assert_int_equal(pthread_create(&t, NULL, fake_dest, &sc), 0);
		assert_int_equal(vmig_migrate(s, uri), 0);
		assert_int_equal(vmig_start_postcopy(s), 0);
		__atomic_store_n(&sc.go, true, __ATOMIC_RELEASE);
		pthread_join(t, NULL);
		st = wait_end(s, VMIG_STATUS_POSTCOPY_PAUSED);
		assert_int_equal(st.status, VMIG_STATUS_POSTCOPY_PAUSED);
		assert_false(vm.running);
		if (resumed) {
			assert_int_equal(vmig_cancel(s), -EBUSY);
		} else {
			assert_int_equal(vmig_cancel(s), 0);
			/* Out of the pause as the call returns. */
			vmig_query(s, &st);
			assert_int_not_equal(st.status, VMIG_STATUS_POSTCOPY_PAUSED);
			for (int i = 0; i < 5000 && st.status == VMIG_STATUS_CANCELLING; i++) {
				usleep(1000);
				vmig_query(s, &st);
			}
			assert_int_equal(st.status, VMIG_STATUS_FAILED);
			assert_true(st.handover_unknown);
		}
		assert_int_equal(vm.starts, 0);
		assert_false(vm.running);
		close(sc.held_fd);
		close(sc.lfd);
		unlink(path);
		free_session(s, &vm);
	}
}

/*
 * The embedder's errors and the migration's are apart: the control thread
 * makes API calls fail (and reads vmig_session_error) while a migration
 * fails on its own threads. ThreadSanitizer (make check) checks that no
 * byte of either is shared; the texts must not mix either.
 */
struct api_caller {
	vmig_session *s;
	bool stop; /* atomic */
	unsigned calls;
};

static void *call_api(void *arg)
{
	struct api_caller *c = arg;

	while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
		assert_int_equal(vmig_parameter_set(c->s, "no-such-parameter", 1), -ENOENT);
		assert_non_null(strstr(vmig_session_error(c->s), "no-such-parameter"));
		__atomic_add_fetch(&c->calls, 1, __ATOMIC_RELEASE);
	}
	return NULL;
}

static void test_errors_apart(void **state)
{
	struct dest_script sc = {.at_eos = REPLY_ERROR};
	struct fake_vm vm;
	vmig_session *s = new_session(&vm, true);
	struct api_caller c = {.s = s};
	char path[108], uri[120];
	struct vmig_stats st;
	pthread_t t, caller;
	unsigned at_end;

	sc.calls = &c.calls;
	sock_path(path, sizeof(path), "err");
	snprintf(uri, sizeof(uri), "unix:%s", path);
	sc.lfd = listen_unix(path);
	assert_int_equal(pthread_create(&t, NULL, fake_dest, &sc), 0);
	assert_int_equal(pthread_create(&caller, NULL, call_api, &c), 0);
	assert_int_equal(vmig_migrate(s, uri), 0);
	st = wait_end(s, VMIG_STATUS_NONE);
	at_end = __atomic_load_n(&c.calls, __ATOMIC_ACQUIRE);
	__atomic_store_n(&c.stop, true, __ATOMIC_RELEASE);
	pthread_join(caller, NULL);
	pthread_join(t, NULL);
	assert_int_equal(st.status, VMIG_STATUS_FAILED);
	assert_non_null(strstr(st.error_desc, "refused"));
	assert_null(strstr(st.error_desc, "no-such-parameter"));
	/* The destination held its reply until 100 calls had been made: they
	 * ran while the migration was on. */
	assert_true(at_end >= 100);
	close(sc.lfd);
	unlink(path);
	free_session(s, &vm);
}

/* ---- the destination's listener ---------------------------------------- */

/*
 * A new migrate-incoming right after the previous one ended must get a
 * listener of its own: the previous migration thread must not close it
 * while it winds down.
 */
static void test_incoming_again_keeps_listener(void **state)
{
	struct fake_vm vm;
	vmig_session *s = new_session(&vm, false);
	char path[108], uri[120];

	sock_path(path, sizeof(path), "dst");
	snprintf(uri, sizeof(uri), "unix:%s", path);
	for (int i = 0; i < 200; i++) {
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

		assert_int_equal(vmig_incoming(s, uri), 0);
		snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
		assert_int_equal(connect(c, (struct sockaddr *)&sa, sizeof(sa)), 0);
		close(c);
		assert_int_equal(vmig_cancel(s), 0);
		/* Spin: the next incoming must come while the old thread may
		 * still be winding down. */
		for (struct vmig_stats st = {0}; st.status != VMIG_STATUS_CANCELLED;)
			vmig_query(s, &st);
	}
	unlink(path);
	free_session(s, &vm);
}

/* ---- the test as source, after the post-copy switch -------------------- */

static int connect_unix(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	for (int i = 0; i < 1000 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)); i++)
		usleep(1000);
	return fd;
}

enum pc_fault { PC_BAD_MAIN, PC_BAD_URGENT, PC_CUT };

/*
 * Bring a destination with postcopy-ram past the switch (it starts the
 * guest), then break it as told. Returns the destination's end state.
 */
static struct vmig_stats run_postcopy_dest(enum pc_fault fault, struct fake_vm *vm,
					   uint8_t *rp_type, unsigned *stops)
{
	vmig_session *s = new_session(vm, false);
	struct vmig__writer *w = malloc(sizeof(*w)), *uw = malloc(sizeof(*uw));
	uint8_t blocks[4 + sizeof(struct vmig_wire_block) + 6];
	struct vmig_wire_block wb = {.name_len = 6, .page_size = VMIG_PAGE_SIZE, .size = RAM_SIZE};
	uint8_t garbage[64];
	uint8_t *pages = malloc(NPAGES / 2 * VMIG_PAGE_SIZE);
	char path[108], uri[120];
	struct vmig_wire_rec rec;
	struct vmig_stats st;
	uint32_t one = 1;
	int fd, ufd;

	memset(garbage, 0xff, sizeof(garbage));
	sock_path(path, sizeof(path), "pc");
	snprintf(uri, sizeof(uri), "unix:%s", path);
	assert_int_equal(vmig_capability_set(s, "postcopy-ram", true), 0);
	assert_int_equal(vmig_incoming(s, uri), 0);
	fd = connect_unix(path);
	ufd = connect_unix(path);
	memcpy(blocks, &one, 4);
	memcpy(blocks + 4, &wb, sizeof(wb));
	memcpy(blocks + 4 + sizeof(wb), "pc.ram", 6);
	vmig__writer_init(w, vmig__chan_from_fd(fd));
	vmig__writer_init(uw, vmig__chan_from_fd(ufd));
	vmig__writer_preamble(uw, VMIG_CHAN_URGENT, 0, (struct vmig_wire_sid){7, 7});
	assert_int_equal(vmig__writer_flush(uw), 0);
	vmig__writer_preamble(w, VMIG_CHAN_MAIN, 0, (struct vmig_wire_sid){7, 7});
	vmig__writer_rec(w, VMIG_REC_BLOCKS, blocks, sizeof(blocks));
	/* From a copy: the destination writes vm->ram as these pages land. */
	memcpy(pages, vm->ram, NPAGES / 2 * VMIG_PAGE_SIZE);
	vmig__writer_pages(w, 0, 0, NPAGES / 2, pages, NULL); /* the rest never comes */
	vmig__writer_rec(w, VMIG_REC_STATE, "state", 5);
	vmig__writer_rec(w, VMIG_REC_POSTCOPY_RUN, NULL, 0);
	assert_int_equal(vmig__writer_flush(w), 0);
	for (int i = 0; i < 10000; i++) { /* the guest runs there now */
		if (__atomic_load_n(&vm->starts, __ATOMIC_ACQUIRE))
			break;
		usleep(1000);
	}
	assert_int_equal(vm->starts, 1);
	if (fault == PC_BAD_MAIN)
		assert_int_equal(vmig__write_full(fd, garbage, sizeof(garbage)), 0);
	else if (fault == PC_BAD_URGENT)
		assert_int_equal(vmig__write_full(ufd, garbage, sizeof(garbage)), 0);
	else
		shutdown(fd, SHUT_WR);
	st = wait_end(s, VMIG_STATUS_POSTCOPY_PAUSED);
	*stops = __atomic_load_n(&vm->stops, __ATOMIC_ACQUIRE);
	*rp_type = 0;
	/* What the destination said last on the return path. */
	while (fault != PC_CUT && vmig__read_full(fd, &rec, sizeof(rec)) == 0) {
		char text[256];

		*rp_type = rec.type;
		if (rec.len > sizeof(text) || vmig__read_full(fd, text, rec.len))
			break;
	}
	if (fault != PC_CUT) /* a failed destination takes no other migration */
		assert_int_equal(vmig_incoming(s, uri), -EBUSY);
	if (fault == PC_CUT) {
		/* migrate-recover leaves the pause as it returns: a look right
		 * after must not find the old pause and take it for a new one. */
		struct vmig_stats now;

		assert_int_equal(vmig_recover(s, uri), 0);
		vmig_query(s, &now);
		assert_int_equal(now.status, VMIG_STATUS_POSTCOPY_RECOVER);
		assert_int_equal(vmig_recover(s, uri), -EINVAL); /* once */
	}
	vmig__chan_free(w->c);
	vmig__chan_free(uw->c);
	free(w);
	free(uw);
	free(pages);
	unlink(path);
	free_session(s, vm); /* lets go of the registration: no use after free */
	return st;
}

static void test_postcopy_bad_record_stops_guest(void **state)
{
	for (int f = PC_BAD_MAIN; f <= PC_BAD_URGENT; f++) {
		struct fake_vm vm;
		uint8_t rp;
		unsigned stops;
		struct vmig_stats st = run_postcopy_dest((enum pc_fault)f, &vm, &rp, &stops);

		assert_int_equal(st.status, VMIG_STATUS_FAILED);
		assert_true(st.ram_incomplete);
		assert_int_equal(vm.starts, 1);
		assert_int_equal(stops, 1); /* stopped after it had started */
		assert_int_equal(rp, VMIG_RP_ERROR);
		if (f == PC_BAD_URGENT && !strstr(st.error_desc, "urgent channel"))
			fail_msg("error-desc: %s", st.error_desc);
	}
}

static void test_postcopy_cut_pauses(void **state)
{
	struct fake_vm vm;
	uint8_t rp;
	unsigned stops;
	struct vmig_stats st = run_postcopy_dest(PC_CUT, &vm, &rp, &stops);

	assert_int_equal(st.status, VMIG_STATUS_POSTCOPY_PAUSED);
	assert_false(st.ram_incomplete);
	assert_int_equal(vm.starts, 1);
	assert_int_equal(stops, 0); /* paused, not stopped: it waits for pages */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_resumed_completes),
	    cmocka_unit_test(test_postcopy_request_at_stop_sends_all),
	    cmocka_unit_test(test_lost_after_commit_stays_stopped),
	    cmocka_unit_test(test_cancel_after_commit_stays_stopped),
	    cmocka_unit_test(test_refused_resumes),
	    cmocka_unit_test(test_lost_before_commit_runs_on),
	    cmocka_unit_test(test_pause_before_switchover),
	    cmocka_unit_test(test_postcopy_lost_at_switch),
	    cmocka_unit_test(test_postcopy_digest_waits_for_requests),
	    cmocka_unit_test(test_errors_apart),
	    cmocka_unit_test(test_incoming_again_keeps_listener),
	    cmocka_unit_test(test_postcopy_bad_record_stops_guest),
	    cmocka_unit_test(test_postcopy_cut_pauses),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
