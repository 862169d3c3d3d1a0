// SPDX-License-Identifier: MIT
/*
 * Post-copy support of the vhost-user back-end (VHOST_USER_PROTOCOL_F_PAGEFAULT):
 * the userfaultfd that lets the front-end (QEMU on the migration destination)
 * resolve the page faults our threads take on guest memory that has not
 * arrived yet.
 *
 * Sequence (QEMU 7.2, destination side): POSTCOPY_ADVISE -> we open a
 * userfaultfd and hand it over in the reply; POSTCOPY_LISTEN -> from now on
 * every memory region we map is registered on that fd in MISSING mode, and
 * the mapping reply (SET_MEM_TABLE or each ADD_MEM_REG) tells QEMU our address
 * of each region, so it can turn a fault address into a RAM block offset;
 * QEMU then sends one u64 "ack" message, after which it can serve faults, so
 * no ring may start before it; POSTCOPY_END -> unregister and close.
 *
 * The fault path itself is the kernel's: a queue thread (or the control
 * thread reading ring indices) that touches a missing page sleeps in the
 * kernel, QEMU reads the fault from its copy of the fd, places the page in
 * its own mapping of the same shared memory and wakes us with UFFDIO_WAKE.
 * We hold no lock while touching guest memory, so nothing of ours can block
 * the placement.
 *
 * Threat model: the front-end is untrusted. Every message is bounds-checked
 * by the table in dev.c first; here out-of-order messages (LISTEN without
 * ADVISE, END without ADVISE) are refused with an error reply, never acted on.
 *
 * Threads: the control thread only.
 */
#include "vhost/vhost.h"
#include "util/compat.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int uffd_open(void)
{
	struct uffdio_api api = {.api = UFFD_API, .features = 0};
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

#ifdef USERFAULTFD_IOC_NEW
	/* Without CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd=0 the
	 * syscall is refused; /dev/userfaultfd (6.1) may still be allowed. */
	if (fd < 0 && errno == EPERM) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);

		if (dev >= 0) {
			fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
			close(dev);
		}
	}
#endif
	if (fd < 0)
		return -errno;
	/* No features: MISSING faults on shared memory need none, and QEMU
	 * only reads plain page-fault messages from this fd. */
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	return fd;
}

static void region_range(const struct vhost_mem_region *r, struct uffdio_range *rg)
{
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);

	rg->start = (uint64_t)(uintptr_t)r->map;
	rg->len = ((uint64_t)r->map_len + page - 1) & ~(page - 1);
}

void vhost_pc_init(struct vhost_postcopy *pc)
{
	memset(pc, 0, sizeof(*pc));
	pc->uffd = -1;
}

int vhost_pc_advise(struct vhost_dev *d)
{
	struct vhost_postcopy *pc = &d->pc;
	int fd;

	if (pc->state == VHOST_PC_LISTENING) {
		snprintf(d->err, sizeof(d->err), "POSTCOPY_ADVISE while listening");
		return -EBUSY;
	}
	fd = uffd_open();
	if (fd < 0) {
		snprintf(d->err, sizeof(d->err), "POSTCOPY_ADVISE: userfaultfd: %s", strerror(-fd));
		return fd;
	}
	/* A repeated ADVISE (a retried incoming migration) replaces the fd. */
	if (pc->uffd >= 0)
		close(pc->uffd);
	pc->uffd = fd;
	pc->state = VHOST_PC_ADVISED;
	pc->advises++;
	return 0;
}

int vhost_pc_listen(struct vhost_dev *d)
{
	struct vhost_postcopy *pc = &d->pc;

	if (pc->state != VHOST_PC_ADVISED) {
		snprintf(d->err, sizeof(d->err), "POSTCOPY_LISTEN without POSTCOPY_ADVISE");
		return -EPROTO;
	}
	/* Regions mapped before LISTEN are not registered and QEMU never
	 * learns our addresses for them, so their faults could not be served:
	 * a page we touched there would be filled with zeros behind QEMU's
	 * back. QEMU does not map the table before the device starts, which
	 * on the destination is after LISTEN; refuse anything else. */
	if (d->mem.nregions) {
		snprintf(d->err, sizeof(d->err),
			 "POSTCOPY_LISTEN: %u regions already mapped without faults",
			 d->mem.nregions);
		return -EBUSY;
	}
	pc->state = VHOST_PC_LISTENING;
	return 0;
}

int vhost_pc_register(struct vhost_dev *d, const struct vhost_mem_region *r)
{
	struct uffdio_register reg = {.mode = UFFDIO_REGISTER_MODE_MISSING};

	region_range(r, &reg.range);
	if (ioctl(d->pc.uffd, UFFDIO_REGISTER, &reg) < 0) {
		int e = errno;

		snprintf(d->err, sizeof(d->err), "userfaultfd register of %llu bytes: %s",
			 (unsigned long long)reg.range.len, strerror(e));
		return -e;
	}
	d->pc.registered++;
	return 0;
}

void vhost_pc_end(struct vhost_dev *d)
{
	struct vhost_postcopy *pc = &d->pc;

	if (pc->uffd >= 0) {
		/* Every page has arrived by now; unregistering also wakes any
		 * thread still asleep on one, which then simply retries. */
		for (uint32_t i = 0; i < d->mem.nregions; i++) {
			struct uffdio_range rg;

			region_range(&d->mem.r[i], &rg);
			ioctl(pc->uffd, UFFDIO_UNREGISTER, &rg);
		}
		close(pc->uffd);
	}
	pc->uffd = -1;
	pc->state = VHOST_PC_OFF;
	pc->mem_ack_pending = false;
}

bool vhost_pc_is_mem_ack(const struct vhost_dev *d, const struct vhost_msg *m)
{
	uint32_t req = m->hdr.request;

	/* QEMU sends the ack with whatever request id its message buffer last
	 * held: SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, or NONE when it had
	 * nothing to add or remove. Real mapping messages carry fds and 40+
	 * bytes, so a bare u64 without fds cannot be mistaken for one. */
	if (d->pc.state != VHOST_PC_LISTENING || m->nfds || m->hdr.size != sizeof(uint64_t))
		return false;
	return req == VHOST_USER_NONE || req == VHOST_USER_SET_MEM_TABLE ||
	       req == VHOST_USER_ADD_MEM_REG || req == VHOST_USER_REM_MEM_REG;
}
