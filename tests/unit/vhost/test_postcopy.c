// SPDX-License-Identifier: MIT
/*
 * Unit tests of post-copy message handling (lib/vhost/postcopy.c and its
 * handlers in dev.c): the ADVISE / LISTEN / END order (out of order is an
 * error reply, never a crash), the PAGEFAULT feature gate, the post-copy
 * mapping replies (SET_MEM_TABLE and ADD_MEM_REG report our address of each
 * region in userspace_addr, same size as the request), rings held back until
 * the front-end's ack, and the fault path itself: this test plays QEMU,
 * reads the fault a thread takes on a missing page from the userfaultfd the
 * ADVISE reply handed over, checks that the address lies where the mapping
 * reply said, fills the page through the memfd and wakes the thread.
 * Needs userfaultfd (root, or vm.unprivileged_userfaultfd=1): without it
 * the tests fail, they do not skip.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
#include <cmocka.h>

#include "harness.h"

#define MISSING_GPA 0x80000ull /* a page of region 0 the test never touches */

struct stub {
	int starts;
};

static void stub_config(void *opaque, uint8_t *cfg)
{
	memset(cfg, 0, VHOST_USER_CONFIG_MAX);
}

static int stub_start(void *opaque, struct vhost_vring *vr)
{
	((struct stub *)opaque)->starts++;
	return 0;
}

static void stub_stop(void *opaque, struct vhost_vring *vr) {}

static const struct vhost_dev_ops stub_ops = {stub_config, stub_start, stub_stop};

static struct vhost_msg msg(uint32_t req, uint32_t size, uint32_t flags)
{
	struct vhost_msg m;

	memset(&m, 0, sizeof(m));
	m.hdr.request = req;
	m.hdr.flags = VHOST_USER_VERSION | flags;
	m.hdr.size = size;
	for (unsigned i = 0; i < VHOST_USER_MAX_FDS; i++)
		m.fds[i] = -1;
	return m;
}

static int send_u64(struct vhost_dev *d, uint32_t req, uint64_t v, struct vhost_msg *reply)
{
	struct vhost_msg m = msg(req, 8, 0);

	m.p.u64 = v;
	return vhost_dev_handle(d, &m, reply);
}

/* LISTEN / END as QEMU sends them: no payload, NEED_REPLY set. */
static int send_bare(struct vhost_dev *d, uint32_t req, struct vhost_msg *reply)
{
	struct vhost_msg m = msg(req, 0, VHOST_USER_NEED_REPLY_MASK);

	return vhost_dev_handle(d, &m, reply);
}

static void dev_setup(struct vhost_dev *d, struct stub *s, uint64_t protocol)
{
	struct vhost_msg reply;

	vhost_dev_init(d, 1, 0, &stub_ops, s);
	assert_int_equal(send_u64(d, VHOST_USER_SET_PROTOCOL_FEATURES, protocol, &reply), 0);
}

static bool is_userfaultfd(int fd)
{
	char path[64], target[64];
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, target, sizeof(target) - 1);
	if (n < 0)
		return false;
	target[n] = 0;
	return strstr(target, "userfaultfd") != NULL;
}

/* ADVISE; returns the front-end's copy of the uffd from the reply. */
static int advise(struct vhost_dev *d)
{
	struct vhost_msg m = msg(VHOST_USER_POSTCOPY_ADVISE, 0, 0), reply;

	assert_int_equal(vhost_dev_handle(d, &m, &reply), 1);
	assert_int_equal(reply.hdr.request, VHOST_USER_POSTCOPY_ADVISE);
	assert_int_equal(reply.hdr.size, 0); /* QEMU insists on an empty payload */
	assert_int_equal(reply.nfds, 1);
	assert_true(is_userfaultfd(reply.fds[0]));
	assert_int_equal(d->pc.state, VHOST_PC_ADVISED);
	return reply.fds[0];
}

static void test_order(void **state)
{
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	int ufd;

	/* Without PAGEFAULT negotiated the messages are protocol errors. */
	dev_setup(&d, &s, 0);
	m = msg(VHOST_USER_POSTCOPY_ADVISE, 0, 0);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);
	assert_int_equal(d.pc.uffd, -1);
	vhost_dev_reset(&d);

	dev_setup(&d, &s, 1ull << VHOST_USER_PROTOCOL_F_PAGEFAULT);
	assert_true(d.offered_protocol & (1ull << VHOST_USER_PROTOCOL_F_PAGEFAULT));
	/* LISTEN and END before ADVISE: an error status, state unchanged. */
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_LISTEN, &reply), 1);
	assert_int_equal(reply.hdr.size, 8);
	assert_int_not_equal(reply.p.u64, 0);
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_END, &reply), 1);
	assert_int_not_equal(reply.p.u64, 0);
	assert_int_equal(d.pc.state, VHOST_PC_OFF);
	/* A payload on LISTEN is refused by the table, before the handler. */
	m = msg(VHOST_USER_POSTCOPY_LISTEN, 8, 0);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);

	ufd = advise(&d);
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_LISTEN, &reply), 1);
	assert_int_equal(reply.p.u64, 0);
	assert_int_equal(d.pc.state, VHOST_PC_LISTENING);
	/* ADVISE while listening is refused and keeps the fd. */
	m = msg(VHOST_USER_POSTCOPY_ADVISE, 0, 0);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.nfds, 0);
	assert_int_equal(d.pc.state, VHOST_PC_LISTENING);
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_END, &reply), 1);
	assert_int_equal(reply.p.u64, 0);
	assert_int_equal(d.pc.state, VHOST_PC_OFF);
	assert_int_equal(d.pc.uffd, -1);
	/* A second END is out of order again. */
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_END, &reply), 1);
	assert_int_not_equal(reply.p.u64, 0);
	close(ufd);

	/* Reset (disconnect) while listening drops the uffd. */
	ufd = advise(&d);
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_LISTEN, &reply), 1);
	vhost_dev_reset(&d);
	assert_int_equal(d.pc.state, VHOST_PC_OFF);
	assert_int_equal(d.pc.uffd, -1);
	close(ufd);
}

static struct vhost_msg mem_table_msg(struct harness *h)
{
	struct vhost_msg m = msg(VHOST_USER_SET_MEM_TABLE, 8 + 2 * 32, 0);

	m.p.mem.nregions = 2;
	for (int i = 0; i < 2; i++) {
		m.p.mem.regions[i] = (struct vhost_user_mem_region){i * H_REGION, H_REGION,
								    H_UVA_BASE + i * H_REGION, 0};
		m.fds[i] = dup(h->fd[i]);
	}
	m.nfds = 2;
	return m;
}

/* Ring 0 complete except for the memory table. */
static void ring_setup(struct vhost_dev *d)
{
	struct vhost_user_vring_addr a = {
	    .index = 0,
	    .desc_user_addr = H_UVA_BASE + H_DESC,
	    .avail_user_addr = H_UVA_BASE + H_AVAIL,
	    .used_user_addr = H_UVA_BASE + H_USED,
	};
	struct vhost_msg m = msg(VHOST_USER_SET_VRING_ADDR, sizeof(a), 0), reply;

	m.p.addr = a;
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
	m = msg(VHOST_USER_SET_VRING_NUM, 8, 0);
	m.p.state = (struct vhost_user_vring_state){0, 8};
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
	assert_int_equal(send_u64(d, VHOST_USER_SET_FEATURES, 0, &reply), 0);
	m = msg(VHOST_USER_SET_VRING_KICK, 8, 0);
	m.fds[0] = eventfd(0, EFD_CLOEXEC);
	m.nfds = 1;
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
}

/* Harness memfds with the ring pages present (a ring start reads them on
 * this thread) and everything from MISSING_GPA on still a hole. */
static void harness_rings_present(struct harness *h)
{
	h_init(h, 8, false, false);
	memset(h->ram[0], 0, 0x20000);
}

static void *toucher(void *arg)
{
	uint64_t v = *(volatile uint64_t *)arg;

	return (void *)(uintptr_t)v;
}

/* Play QEMU: take the fault from ufd, check its address, place the page
 * through the memfd and wake the faulting thread. */
static void serve_fault(int ufd, uint64_t expect_addr, int memfd, uint64_t offset, uint64_t value)
{
	struct pollfd p = {.fd = ufd, .events = POLLIN};
	struct uffd_msg um;
	struct uffdio_range wake;
	uint8_t page[4096] = {0};
	long pagesz = sysconf(_SC_PAGESIZE);

	assert_int_equal(poll(&p, 1, 5000), 1); /* bounded: 5 s */
	assert_int_equal(read(ufd, &um, sizeof(um)), sizeof(um));
	assert_int_equal(um.event, UFFD_EVENT_PAGEFAULT);
	assert_int_equal(um.arg.pagefault.address & ~(uint64_t)(pagesz - 1),
			 expect_addr & ~(uint64_t)(pagesz - 1));
	memcpy(page, &value, sizeof(value));
	assert_int_equal(pwrite(memfd, page, sizeof(page), (off_t)offset), sizeof(page));
	wake.start = expect_addr & ~(uint64_t)(pagesz - 1);
	wake.len = (uint64_t)pagesz;
	assert_int_equal(ioctl(ufd, UFFDIO_WAKE, &wake), 0);
}

static void test_mem_table_reply_and_fault(void **state)
{
	struct harness h;
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	pthread_t t;
	void *got;
	uint64_t base, reported;
	int ufd;

	harness_rings_present(&h);
	dev_setup(&d, &s, 1ull << VHOST_USER_PROTOCOL_F_PAGEFAULT);
	ring_setup(&d);
	ufd = advise(&d);
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_LISTEN, &reply), 1);
	m = mem_table_msg(&h);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	/* Same request, same size, our addresses in userspace_addr. */
	assert_int_equal(reply.hdr.request, VHOST_USER_SET_MEM_TABLE);
	assert_int_equal(reply.hdr.size, 8 + 2 * 32);
	assert_int_equal(reply.nfds, 0);
	assert_int_equal(reply.p.mem.nregions, 2);
	for (int i = 0; i < 2; i++) {
		const struct vhost_user_mem_region *r = &reply.p.mem.regions[i];

		assert_int_equal(r->guest_phys_addr, i * H_REGION);
		assert_int_equal(r->memory_size, H_REGION);
		assert_int_equal(r->mmap_offset, 0);
		assert_int_equal(r->userspace_addr, (uint64_t)(uintptr_t)d.mem.r[i].hva);
	}
	reported = reply.p.mem.regions[0].userspace_addr;
	assert_int_equal(d.pc.registered, 2);
	/* Everything else is ready, but the ring waits for the ack. */
	assert_int_equal(s.starts, 0);
	assert_true(d.pc.mem_ack_pending);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_MEM_TABLE, 0, &reply), 0);
	assert_false(d.pc.mem_ack_pending);
	assert_int_equal(s.starts, 1);

	/* A missing page faults to the front-end, at the address the reply
	 * reported plus the page's offset in the region. */
	base = (uint64_t)(uintptr_t)d.mem.r[0].hva;
	assert_int_equal(pthread_create(&t, NULL, toucher, (void *)(uintptr_t)(base + MISSING_GPA)),
			 0);
	serve_fault(ufd, reported + MISSING_GPA, h.fd[0], MISSING_GPA, 0x1122334455667788ull);
	assert_int_equal(pthread_join(t, &got), 0);
	assert_int_equal((uint64_t)(uintptr_t)got, 0x1122334455667788ull);

	/* After END the same kind of access no longer faults. */
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_END, &reply), 1);
	assert_int_equal(reply.p.u64, 0);
	assert_int_equal(*(volatile uint64_t *)(uintptr_t)(base + MISSING_GPA + 0x1000), 0);
	close(ufd);
	vhost_dev_reset(&d);
	h_free(&h);
}

static void test_add_mem_reg_reply(void **state)
{
	struct harness h;
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	int ufd;

	harness_rings_present(&h);
	dev_setup(&d, &s,
		  1ull << VHOST_USER_PROTOCOL_F_PAGEFAULT |
		      1ull << VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS);
	ring_setup(&d);
	ufd = advise(&d);
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_LISTEN, &reply), 1);
	for (int i = 0; i < 2; i++) {
		m = msg(VHOST_USER_ADD_MEM_REG, sizeof(struct vhost_user_mem_single), 0);
		m.p.mem_single.region = (struct vhost_user_mem_region){
		    i * H_REGION, H_REGION, H_UVA_BASE + i * H_REGION, 0};
		m.fds[0] = dup(h.fd[i]);
		m.nfds = 1;
		assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
		assert_int_equal(reply.hdr.request, VHOST_USER_ADD_MEM_REG);
		assert_int_equal(reply.hdr.size, sizeof(struct vhost_user_mem_single));
		assert_int_equal(reply.p.mem_single.region.guest_phys_addr, i * H_REGION);
		assert_int_equal(reply.p.mem_single.region.userspace_addr,
				 (uint64_t)(uintptr_t)d.mem.r[i].hva);
		assert_int_equal(s.starts, 0);
	}
	/* QEMU's ack after a batch of ADD_MEM_REG carries that request id. */
	assert_int_equal(send_u64(&d, VHOST_USER_ADD_MEM_REG, 0, &reply), 0);
	assert_int_equal(s.starts, 1);
	/* An ack with request id 0 (nothing added) is accepted too. */
	assert_int_equal(send_u64(&d, VHOST_USER_NONE, 0, &reply), 0);
	assert_int_equal(d.msg_errors, 0);
	/* Outside post-copy the same bare u64 is an unknown request. */
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_END, &reply), 1);
	assert_int_equal(send_u64(&d, VHOST_USER_NONE, 0, &reply), -EPROTO);
	close(ufd);
	vhost_dev_reset(&d);
	h_free(&h);
}

static void test_listen_with_memory_mapped(void **state)
{
	struct harness h;
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	int ufd;

	harness_rings_present(&h);
	dev_setup(&d, &s, 1ull << VHOST_USER_PROTOCOL_F_PAGEFAULT);
	ufd = advise(&d);
	m = mem_table_msg(&h); /* before LISTEN: an ordinary table, no reply */
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 0);
	assert_int_equal(d.pc.registered, 0);
	/* Those mappings cannot be served: LISTEN is refused. */
	assert_int_equal(send_bare(&d, VHOST_USER_POSTCOPY_LISTEN, &reply), 1);
	assert_int_not_equal(reply.p.u64, 0);
	assert_int_equal(d.pc.state, VHOST_PC_ADVISED);
	close(ufd);
	vhost_dev_reset(&d);
	h_free(&h);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_order),
	    cmocka_unit_test(test_mem_table_reply_and_fault),
	    cmocka_unit_test(test_add_mem_reg_reply),
	    cmocka_unit_test(test_listen_with_memory_mapped),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
