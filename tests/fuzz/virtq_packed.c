// SPDX-License-Identifier: MIT
/*
 * Fuzz target: a hostile guest's packed virtqueue and the in-flight region
 * a crashed back-end left behind (lib/vhost/packed.c,
 * lib/vhost/inflight_packed.c), as the daemon meets them when it starts a
 * ring again: recovery, the buffers it redoes, then the ring itself.
 *
 * Input: byte 0 = flags (bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bit 2 use an
 * in-flight region, bit 3 dirty logging), byte 1 = log2 of the queue size
 * (clamped to 0..8), bytes 2-3 = the ring base the front-end "sent"
 * (position | wrap << 15; a position outside the ring is taken modulo its
 * size, as the daemon refuses it earlier); then the in-flight region
 * (vhost_inflight_packed_queue_size(num) bytes), then guest memory: two
 * adjacent 64 KiB regions at guest physical 0, with the descriptor ring at
 * 0x0000, the driver event area at 0x1000 and the device event area at
 * 0x2000. Missing bytes are zero. Nothing the region says may make the
 * back-end touch memory outside the guest's, redo more buffers than the
 * ring holds, or use a ring whose position it could not trust.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhost/inflight.h"
#include "vhost/vhost.h"

#include "fuzz.h"
#include "guestmem.h"

#define REGION FUZZ_REGION
#define UVA FUZZ_UVA

static struct vhost_mem mem;
static uint8_t *ram;
static uint8_t log_bits[(2 * REGION / VHOST_LOG_PAGE + 7) / 8];

static void setup_once(void)
{
	if (!ram)
		ram = fuzz_guest_mem(&mem, "fuzz-virtq-packed");
}

/* Map a buffer as the daemon would, touching every byte it would use. */
static void use(struct vhost_vq *vq, uint16_t id)
{
	static struct iovec iov[64];
	static uint64_t gpa[64];
	struct vhost_chain c = {.max = 64, .iov = iov, .gpa = gpa};

	if (vhost_vq_map_chain(vq, id, &c) == 0) {
		for (unsigned k = 0; k < (unsigned)c.nout + c.nin; k++)
			if (iov[k].iov_len)
				((volatile uint8_t *)iov[k].iov_base)[iov[k].iov_len - 1] ^= 0;
		vhost_vq_log_chain(vq, &c);
	}
	vhost_vq_push(vq, id, 1);
}

static void run_queue(struct vhost_vq *vq)
{
	uint16_t id;

	for (unsigned i = 0; i < 2u * vq->num + 2 && !vq->broken; i++) {
		if (vhost_vq_pop(vq, &id) != 1)
			break;
		use(vq, id);
		if (i % 3 == 0)
			vhost_vq_flush(vq);
	}
	vhost_vq_flush(vq);
	vhost_vq_enable_notify(vq);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint16_t batch[256], resubmit[256];
	static struct vhost_log log = {.bits = log_bits, .size = sizeof(log_bits), .fd = -1};
	uint64_t features = (1ull << VIRTIO_F_RING_PACKED) | (1ull << VIRTIO_F_VERSION_1);
	struct vhost_inflight_packed *inf = NULL;
	struct vhost_inflight_recovery rec;
	struct vhost_vq vq;
	uint8_t hdr[4];
	uint16_t num, base;
	size_t inf_size;

	setup_once();
	fuzz_take(&data, &size, hdr, sizeof(hdr));
	num = (uint16_t)(1u << (hdr[1] % 9));
	base = (uint16_t)(hdr[2] | hdr[3] << 8);
	base = (uint16_t)((base & 0x8000u) | ((base & 0x7fffu) % num));
	if (hdr[0] & 1)
		features |= 1ull << VIRTIO_RING_F_EVENT_IDX;
	if (hdr[0] & 2)
		features |= 1ull << VIRTIO_RING_F_INDIRECT_DESC;
	inf_size = vhost_inflight_packed_queue_size(num);
	if (hdr[0] & 4) {
		inf = malloc(inf_size);
		if (!inf)
			abort();
		fuzz_take(&data, &size, inf, inf_size);
	}
	fuzz_take(&data, &size, ram, 2 * REGION);

	memset(&vq, 0, sizeof(vq));
	vq.num = num;
	vq.packed = true;
	vq.event_idx = hdr[0] & 1;
	vq.indirect = hdr[0] & 2;
	vq.mem = &mem;
	vq.batch = batch;
	vq.pk.ring = vhost_mem_uva(&mem, UVA, 16u * num);
	vq.pk.driver_event = vhost_mem_uva(&mem, UVA + 0x1000, 4);
	vq.pk.device_event = vhost_mem_uva(&mem, UVA + 0x2000, 4);
	vq.pk.ring_gpa = 0;
	vq.pk.device_event_gpa = 0x2000;
	if (vhost_packed_alloc(&vq.pk, num))
		abort();
	if (hdr[0] & 8) {
		vq.log = &log;
		vq.log_used = true;
	}
	vq.pk.inflight = inf;
	if (inf) {
		vhost_packed_recover(&vq, features, base, resubmit, &rec);
		if (rec.nresubmit > num)
			abort(); /* never more to redo than the ring holds */
		vq.counter = rec.next_counter - 1;
		if (rec.outcome == VHOST_INFLIGHT_INVALID)
			vq.broken = true; /* as the daemon: the position is lost */
		for (unsigned i = 0; i < rec.nresubmit && !vq.broken; i++) {
			if (resubmit[i] >= num)
				abort(); /* a buffer id the ring cannot have */
			use(&vq, resubmit[i]);
		}
		vq.last_avail_idx = rec.nresubmit;
	} else {
		vhost_packed_reset(&vq, base, features);
	}
	run_queue(&vq);
	vhost_packed_free(&vq.pk);
	free(inf);
	return 0;
}
