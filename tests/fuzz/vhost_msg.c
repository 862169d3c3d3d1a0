// SPDX-License-Identifier: MIT
/*
 * Fuzz target: vhost-user messages from a hostile front-end, through the same
 * validation table and handlers vmig-blk uses (lib/vhost/dev.c).
 *
 * Input: a sequence of records
 *   12-byte vhost-user header | payload (header.size bytes, clamped to what
 *   is left) | 1 byte "fd spec"
 * The fd spec's low 2 bits give how many fds travel with the message (0-3);
 * bit 2 chooses eventfds instead of 1 MiB memfds. So the fuzzer can reach
 * SET_MEM_TABLE, SET_LOG_BASE, SET_INFLIGHT_FD and ring fds with real,
 * mappable descriptors. When a ring starts, the stub device pops and maps a
 * bounded number of chains from whatever guest memory was described, so
 * ring address translation is fuzzed too. Leaks and crashes are findings.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhost/vhost.h"

#include "fuzz.h"

#define FUZZ_FD_MEM (1u << 20)
#define FUZZ_MAX_MSGS 64

static void fuzz_config(void *opaque, uint8_t *cfg)
{
	memset(cfg, 0x5a, VHOST_USER_CONFIG_MAX);
}

static int fuzz_start(void *opaque, struct vhost_vring *vr)
{
	struct iovec iov[16];
	uint64_t gpa[16];
	struct vhost_chain c = {.max = 16, .iov = iov, .gpa = gpa};
	uint16_t head;

	for (unsigned i = 0; i < 4 && vhost_vq_pop(&vr->vq, &head) == 1; i++) {
		vhost_vq_map_chain(&vr->vq, head, &c);
		vhost_vq_push(&vr->vq, head, 0);
	}
	vhost_vq_flush(&vr->vq);
	vhost_vq_enable_notify(&vr->vq);
	return 0;
}

static void fuzz_stop(void *opaque, struct vhost_vring *vr) {}

static const struct vhost_dev_ops fuzz_ops = {fuzz_config, fuzz_start, fuzz_stop};

static int make_fd(bool event)
{
	int fd;

	if (event)
		return eventfd(0, EFD_CLOEXEC);
	fd = memfd_create("fuzz", MFD_CLOEXEC);
	/* Allocated, not just sized: after POSTCOPY_LISTEN the regions are
	 * registered on a userfaultfd that nobody serves, and a ring start
	 * touching a page missing from the memfd would sleep forever. */
	if (fd >= 0 && fallocate(fd, 0, 0, FUZZ_FD_MEM) < 0) {
		close(fd);
		fd = -1;
	}
	return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct vhost_dev dev;
	struct vhost_msg m, reply;
	size_t pos = 0;

	vhost_dev_init(&dev, 2,
		       1ull << VIRTIO_RING_F_EVENT_IDX | 1ull << VIRTIO_RING_F_INDIRECT_DESC,
		       &fuzz_ops, NULL);
	for (unsigned n = 0; n < FUZZ_MAX_MSGS && size - pos >= sizeof(m.hdr); n++) {
		size_t len;
		uint8_t spec = 0;

		memset(&m, 0, sizeof(m));
		for (unsigned i = 0; i < VHOST_USER_MAX_FDS; i++)
			m.fds[i] = -1;
		memcpy(&m.hdr, data + pos, sizeof(m.hdr));
		pos += sizeof(m.hdr);
		len = m.hdr.size;
		if (len > size - pos)
			len = size - pos;
		if (len > sizeof(m.p))
			len = sizeof(m.p);
		memcpy(&m.p, data + pos, len);
		pos += len;
		/* The socket layer refuses sizes beyond the payload union. */
		if (m.hdr.size > VHOST_USER_PAYLOAD_MAX)
			m.hdr.size = (uint32_t)len;
		if (pos < size)
			spec = data[pos++];
		for (unsigned i = 0; i < (spec & 3u); i++)
			m.fds[m.nfds++] = make_fd(spec & 4u);
		if (vhost_dev_handle(&dev, &m, &reply) < 0) {
			vhost_dev_reset(&dev); /* the daemon drops the peer */
			continue;
		}
		vhost_msg_close_fds(&reply);
	}
	vhost_dev_reset(&dev);
	return 0;
}
