// SPDX-License-Identifier: MIT
/*
 * The reference VM: guest RAM in a memfd, the guest's vCPU threads, the run
 * state QEMU would report, and the libvmig session that migrates it. This
 * file is also the example of embedding libvmig: see vm_ops below, which is
 * all a VMM has to provide.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "guest.h"
#include "objects.h"
#include "util/compat.h"
#include "vm.h"


struct vm {
	struct vm_config cfg;
	int memfd;
	uint8_t *ram;
	uint64_t ram_size;
	struct guest *guest;
	vmig_session *session;
	struct vm_objects *objects; /* main thread only */

	pthread_mutex_t lock; /* protects rs and the callback */
	enum vm_runstate rs;
	vm_event_cb cb;
	void *cb_opaque;
};

static const char *const runstate_names[] = {
	[VM_RS_PRELAUNCH] = "prelaunch",     [VM_RS_RUNNING] = "running",
	[VM_RS_PAUSED] = "paused",           [VM_RS_INMIGRATE] = "inmigrate",
	[VM_RS_POSTMIGRATE] = "postmigrate", [VM_RS_FINISH_MIGRATE] = "finish-migrate",
	[VM_RS_SHUTDOWN] = "shutdown",
};

const char *vm_runstate_name(enum vm_runstate rs)
{
	return (unsigned)rs < VMIG_ARRAY_SIZE(runstate_names) ? runstate_names[rs] : "unknown";
}

static void notify(struct vm *vm, enum vm_event ev, const char *status)
{
	vm_event_cb cb;
	void *opaque;

	pthread_mutex_lock(&vm->lock);
	cb = vm->cb;
	opaque = vm->cb_opaque;
	pthread_mutex_unlock(&vm->lock);
	if (cb)
		cb(opaque, ev, status);
}

/* Move to rs; returns the previous state. */
static enum vm_runstate set_runstate(struct vm *vm, enum vm_runstate rs)
{
	enum vm_runstate old;

	pthread_mutex_lock(&vm->lock);
	old = vm->rs;
	vm->rs = rs;
	pthread_mutex_unlock(&vm->lock);
	return old;
}

/* ---- libvmig callbacks (called from libvmig's threads) ---------------- */

static int ops_stop(void *opaque)
{
	struct vm *vm = opaque;
	enum vm_runstate old;

	guest_stop(vm->guest);
	old = set_runstate(vm, VM_RS_FINISH_MIGRATE);
	if (old == VM_RS_RUNNING)
		notify(vm, VM_EV_STOP, NULL);
	return 0;
}

static int ops_start(void *opaque)
{
	struct vm *vm = opaque;

	guest_start(vm->guest);
	set_runstate(vm, VM_RS_RUNNING);
	notify(vm, VM_EV_RESUME, NULL);
	return 0;
}

static bool ops_running(void *opaque)
{
	return vm_is_running(opaque);
}

static int ops_save_state(void *opaque, void *buf, size_t cap, size_t *len)
{
	struct vm *vm = opaque;

	return guest_save(vm->guest, buf, cap, len);
}

static int ops_load_state(void *opaque, const void *buf, size_t len)
{
	struct vm *vm = opaque;
	struct vmig__err err = {{0}};
	int ret = guest_load(vm->guest, buf, len, &err);

	if (ret)
		fprintf(stderr, "vmig-vm: incoming state rejected: %s\n", err.msg);
	return ret;
}

static void ops_throttle(void *opaque, unsigned percent)
{
	struct vm *vm = opaque;

	guest_set_throttle(vm->guest, percent);
}

static void ops_event(void *opaque, const struct vmig_event *ev)
{
	struct vm *vm = opaque;
	struct vmig_stats st;

	if (ev->type != VMIG_EVENT_STATUS)
		return;
	vmig_query(vm->session, &st);
	pthread_mutex_lock(&vm->lock);
	if (st.is_source) {
		if (ev->status == VMIG_STATUS_COMPLETED)
			vm->rs = VM_RS_POSTMIGRATE;
		else if ((ev->status == VMIG_STATUS_FAILED || ev->status == VMIG_STATUS_CANCELLED) &&
			 vm->rs == VM_RS_FINISH_MIGRATE)
			vm->rs = VM_RS_PAUSED; /* was paused before; libvmig restarts a running VM */
	} else if (ev->status == VMIG_STATUS_COMPLETED && vm->rs == VM_RS_INMIGRATE) {
		vm->rs = VM_RS_PAUSED; /* -S: stay stopped until cont */
	} else if (ev->status == VMIG_STATUS_FAILED && st.ram_incomplete) {
		vm->rs = VM_RS_PAUSED; /* stopped for good: cont refuses (vm_cont) */
	}
	pthread_mutex_unlock(&vm->lock);
	notify(vm, VM_EV_MIGRATION, vmig_status_name(ev->status));
}

static bool vcpu_blocked(void *opaque, unsigned index)
{
	return vmig_vcpu_blocked(opaque, index);
}

static const struct vmig_vm_ops vm_ops = {
	.stop = ops_stop,
	.start = ops_start,
	.running = ops_running,
	.save_state = ops_save_state,
	.load_state = ops_load_state,
	.event = ops_event,
	.throttle = ops_throttle,
};

/* ---- RAM --------------------------------------------------------------- */

static void fill_random(uint8_t *ram, uint64_t size, uint64_t seed)
{
	uint64_t *w = (uint64_t *)ram, x = seed | 1;

	for (uint64_t i = 0; i < size / 8; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		w[i] = x;
	}
}

static int fill_file(uint8_t *ram, uint64_t size, const char *path, struct vmig__err *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	uint64_t off = 0;

	if (fd < 0) {
		vmig__err_set(err, "--fill %s: %s", path, strerror(errno));
		return -errno;
	}
	while (off < size) {
		ssize_t n = pread(fd, ram + off, size - off > (1u << 30) ? (1u << 30) : size - off,
				  (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			vmig__err_set(err, "--fill %s: %s", path, strerror(errno));
			close(fd);
			return -EIO;
		}
		if (n == 0)
			break; /* a short file leaves the rest zero */
		off += (uint64_t)n;
	}
	close(fd);
	return 0;
}

/*
 * --mem-prealloc (QEMU's -mem-prealloc): fault all of guest RAM in at start-up,
 * so that nothing later pays for first touch: not the guest, and not an
 * incoming migration, which then writes pages in place. Each thread takes
 * an equal slice.
 *
 * MADV_POPULATE_WRITE allocates the pages and fails cleanly when memory runs
 * short, but it fills the page tables from inside the kernel. Where the host
 * is itself a guest whose hypervisor shadows those tables, the first access
 * from user space still traps, once per page: measured here at 1.3 s per GiB
 * of 4 KiB pages, against 0.05 s for a later pass. So every page is also
 * written once through the mapping (an atomic add of zero, which the guest's
 * own threads cannot race with: they have not started). On bare metal that
 * pass costs a few milliseconds per GiB.
 */
#define HUGE_2M (2ull << 20)

struct prealloc_slice {
	uint8_t *start;
	uint64_t len;
	uint64_t stride; /* the backing page size */
	int ret;
};

static void *prealloc_thread(void *arg)
{
	struct prealloc_slice *sl = arg;

	if (madvise(sl->start, sl->len, MADV_POPULATE_WRITE) && errno != EINVAL) {
		sl->ret = -errno; /* e.g. ENOMEM: not enough memory for the guest */
		return NULL;
	}
	for (uint64_t off = 0; off < sl->len; off += sl->stride)
		__atomic_fetch_add(sl->start + off, 0, __ATOMIC_RELAXED);
	return NULL;
}

static int ram_prealloc(struct vm *vm, struct vmig__err *err)
{
	enum { MAX_THREADS = 8 };
	struct prealloc_slice sl[MAX_THREADS] = {{0}};
	pthread_t tid[MAX_THREADS];
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	uint64_t pages = vm->ram_size / VMIG_PAGE_SIZE, per;
	unsigned n = ncpu < 1 ? 1 : ncpu > MAX_THREADS ? MAX_THREADS : (unsigned)ncpu;
	unsigned started = 0;
	int ret = 0;

	per = (pages + n - 1) / n;
	for (unsigned i = 0; i < n && (uint64_t)i * per < pages; i++) {
		uint64_t first = (uint64_t)i * per;

		sl[i].start = vm->ram + first * VMIG_PAGE_SIZE;
		sl[i].len = (first + per < pages ? per : pages - first) * VMIG_PAGE_SIZE;
		sl[i].stride = vm->cfg.hugetlb ? HUGE_2M : VMIG_PAGE_SIZE;
		if (pthread_create(&tid[i], NULL, prealloc_thread, &sl[i])) {
			prealloc_thread(&sl[i]); /* no thread: do it here */
			continue;
		}
		started |= 1u << i;
	}
	for (unsigned i = 0; i < n; i++) {
		if (started & (1u << i))
			pthread_join(tid[i], NULL);
		if (sl[i].ret && !ret)
			ret = sl[i].ret;
	}
	if (ret)
		vmig__err_set(err, "cannot preallocate %llu bytes of guest RAM: %s",
			      (unsigned long long)vm->ram_size, strerror(-ret));
	return ret;
}

static int ram_create(struct vm *vm, struct vmig__err *err)
{
	unsigned flags = MFD_CLOEXEC | (vm->cfg.hugetlb ? MFD_HUGETLB | MFD_HUGE_2MB : 0);

	if (vm->cfg.hugetlb && vm->ram_size % HUGE_2M) {
		vmig__err_set(err, "--hugetlb: --mem must be a multiple of 2M");
		return -EINVAL;
	}
	vm->memfd = memfd_create("vmig-guest-ram", flags);
	if (vm->memfd < 0 || ftruncate(vm->memfd, (off_t)vm->ram_size)) {
		vmig__err_set(err, "cannot create %llu bytes of guest RAM%s: %s",
			      (unsigned long long)vm->ram_size,
			      vm->cfg.hugetlb ? " in huge pages" : "", strerror(errno));
		return -errno;
	}
	/* hugetlb: the pages are reserved here, so a shortage shows now. */
	vm->ram = mmap(NULL, vm->ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->memfd, 0);
	if (vm->ram == MAP_FAILED) {
		int e = errno;

		vm->ram = NULL;
		if (vm->cfg.hugetlb && e == ENOMEM)
			vmig__err_set(err,
				      "not enough free 2 MiB huge pages for %llu MiB of guest "
				      "RAM (reserve them in /proc/sys/vm/nr_hugepages)",
				      (unsigned long long)(vm->ram_size >> 20));
		else
			vmig__err_set(err, "cannot map guest RAM: %s", strerror(e));
		return -e;
	}
	if (vm->cfg.prealloc) {
		int ret = ram_prealloc(vm, err);

		if (ret)
			return ret;
	}
	if (vm->cfg.incoming)
		return 0;
	if (vm->cfg.fill == VM_FILL_RANDOM)
		fill_random(vm->ram, vm->ram_size, vm->cfg.seed ? vm->cfg.seed : 0x1234567);
	else if (vm->cfg.fill == VM_FILL_FILE)
		return fill_file(vm->ram, vm->ram_size, vm->cfg.fill_path, err);
	return 0;
}

/* ---- public ------------------------------------------------------------ */

int vm_create(struct vm **out, const struct vm_config *cfg, struct vmig__err *err)
{
	struct vmig_ram_block blk;
	struct vm *vm;
	int ret;

	if (!cfg->mem_bytes || cfg->mem_bytes % VMIG_PAGE_SIZE || !cfg->vcpus || cfg->vcpus > 64) {
		vmig__err_set(err, "memory must be a non-zero multiple of 4 KiB, vCPUs 1..64");
		return -EINVAL;
	}
	vm = calloc(1, sizeof(*vm));
	if (!vm)
		return -ENOMEM;
	vm->cfg = *cfg;
	vm->memfd = -1;
	vm->ram_size = cfg->mem_bytes;
	pthread_mutex_init(&vm->lock, NULL);
	ret = vm_objects_new(&vm->objects);
	if (ret) {
		vmig__err_set(err, "cannot create the object registry");
		goto err;
	}
	ret = ram_create(vm, err);
	if (ret)
		goto err;
	ret = guest_create(&vm->guest, vm->ram, vm->ram_size, cfg, !cfg->incoming, err);
	if (ret)
		goto err;
	ret = vmig_session_new(&vm->session, &vm_ops, vm);
	if (ret) {
		vmig__err_set(err, "cannot create the migration session");
		goto err;
	}
	blk = (struct vmig_ram_block){.name = "pc.ram", .host = vm->ram, .size = vm->ram_size,
				      .fd = vm->memfd,
				      .flags = cfg->prealloc ? VMIG_RAM_PREALLOC : 0};
	ret = vmig_ram_block_add(vm->session, &blk);
	if (ret) {
		vmig__err_set(err, "%s", vmig_session_error(vm->session));
		goto err;
	}
	vmig_set_autostart(vm->session, !cfg->start_paused);
	/* So post-copy can charge page faults to the vCPU that waits, and
	 * stop can tell a vCPU that waits on a page from one that runs. */
	for (unsigned i = 0; i < cfg->vcpus; i++)
		vmig_vcpu_register(vm->session, i, guest_vcpu_tid(vm->guest, i));
	guest_set_blocked_check(vm->guest, vcpu_blocked, vm->session);
	if (cfg->incoming) {
		vm->rs = VM_RS_INMIGRATE;
	} else if (cfg->start_paused) {
		vm->rs = VM_RS_PRELAUNCH;
	} else {
		vm->rs = VM_RS_RUNNING;
		guest_start(vm->guest);
	}
	*out = vm;
	return 0;
err:
	vm_destroy(vm);
	return ret;
}

void vm_destroy(struct vm *vm)
{
	if (!vm)
		return;
	/* Stopped first: freeing the session lets go of a failed post-copy's
	 * userfaultfd, and a vCPU waiting on a page would then run on. */
	if (vm->guest)
		guest_stop(vm->guest);
	vmig_session_free(vm->session);
	vm_objects_free(vm->objects);
	guest_destroy(vm->guest);
	if (vm->ram)
		munmap(vm->ram, vm->ram_size);
	if (vm->memfd >= 0)
		close(vm->memfd);
	pthread_mutex_destroy(&vm->lock);
	free(vm);
}

void vm_set_event_cb(struct vm *vm, vm_event_cb cb, void *opaque)
{
	pthread_mutex_lock(&vm->lock);
	vm->cb = cb;
	vm->cb_opaque = opaque;
	pthread_mutex_unlock(&vm->lock);
}

enum vm_runstate vm_get_runstate(struct vm *vm)
{
	enum vm_runstate rs;

	pthread_mutex_lock(&vm->lock);
	rs = vm->rs;
	pthread_mutex_unlock(&vm->lock);
	return rs;
}

bool vm_is_running(struct vm *vm)
{
	return vm_get_runstate(vm) == VM_RS_RUNNING;
}

int vm_stop(struct vm *vm)
{
	enum vm_runstate rs = vm_get_runstate(vm);

	if (rs != VM_RS_RUNNING)
		return 0; /* QEMU: stop on a stopped VM is not an error */
	guest_stop(vm->guest);
	set_runstate(vm, VM_RS_PAUSED);
	notify(vm, VM_EV_STOP, NULL);
	return 0;
}

int vm_cont(struct vm *vm)
{
	enum vm_runstate rs = vm_get_runstate(vm);
	struct vmig_stats st;

	/* Post-copy failed after the guest ran here: pages are missing, and
	 * the source holds the only complete copy. */
	vmig_query(vm->session, &st);
	if (st.ram_incomplete)
		return -ENODATA;

	switch (rs) {
	case VM_RS_RUNNING:
		return 0;
	case VM_RS_INMIGRATE:
		/* As QEMU: start once the incoming migration completes. */
		vmig_set_autostart(vm->session, true);
		return 0;
	case VM_RS_FINISH_MIGRATE:
		return -EBUSY;
	default:
		guest_start(vm->guest);
		set_runstate(vm, VM_RS_RUNNING);
		notify(vm, VM_EV_RESUME, NULL);
		return 0;
	}
}

vmig_session *vm_session(struct vm *vm)
{
	return vm->session;
}

struct vm_objects *vm_objects(struct vm *vm)
{
	return vm->objects;
}

int vm_pmemsave(struct vm *vm, uint64_t addr, uint64_t size, const char *path,
		struct vmig__err *err)
{
	struct vmig_stats st;
	int fd, ret;

	/* Missing pages would block this thread for good (they never come). */
	vmig_query(vm->session, &st);
	if (st.ram_incomplete) {
		vmig__err_set(err, "guest memory is incomplete after a failed post-copy migration");
		return -ENODATA;
	}

	if (addr > vm->ram_size || size > vm->ram_size - addr) {
		vmig__err_set(err, "Invalid addr 0x%llx/size %llu specified", (unsigned long long)addr,
			      (unsigned long long)size);
		return -EINVAL;
	}
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		vmig__err_set(err, "Could not open '%s': %s", path, strerror(errno));
		return -errno;
	}
	ret = vmig__write_full(fd, vm->ram + addr, size);
	if (close(fd) && !ret)
		ret = -errno;
	if (ret)
		vmig__err_set(err, "writing to file '%s' failed: %s", path, strerror(-ret));
	return ret;
}

void vm_guest_stats(struct vm *vm, struct vm_guest_stats *out)
{
	guest_get_stats(vm->guest, out);
}
