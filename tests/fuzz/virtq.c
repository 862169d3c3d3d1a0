// SPDX-License-Identifier: MIT
/*
 * Fuzz target: a hostile guest's split virtqueue and a scribbled in-flight
 * region (lib/vhost/virtq.c, lib/vhost/inflight.c).
 *
 * Input: byte 0 = flags (bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bit 2 use an
 * in-flight region, bit 3 dirty logging), byte 1 = log2 of the queue size
 * (clamped to 0..8), bytes 2-3 = the ring base the front-end "sent"; then
 * the in-flight region (vhost_inflight_queue_size(num) bytes), then guest
 * memory: two adjacent 64 KiB regions at guest physical 0, with the
 * descriptor table at 0x0000, the avail ring at 0x1000 and the used ring at
 * 0x2000. Missing bytes are zero. The target recovers the queue, then pops,
 * maps and completes a bounded number of chains like the daemon does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

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
		ram = fuzz_guest_mem(&mem, "fuzz-virtq");
}

static void run_queue(struct vhost_vq *vq)
{
	static struct iovec iov[64];
	static uint64_t gpa[64];
	struct vhost_chain c = {.max = 64, .iov = iov, .gpa = gpa};
	uint16_t head;

	for (unsigned i = 0; i < 2u * vq->num + 2; i++) {
		int r = vhost_vq_pop(vq, &head);

		if (r != 1)
			break;
		if (vhost_vq_map_chain(vq, head, &c) == 0) {
			/* Touch every byte we would read or write. */
			for (unsigned k = 0; k < (unsigned)c.nout + c.nin; k++)
				if (iov[k].iov_len)
					((volatile uint8_t *)iov[k].iov_base)[iov[k].iov_len - 1] ^=
					    0;
			vhost_vq_log_chain(vq, &c);
		}
		vhost_vq_push(vq, head, 1);
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
	struct vhost_inflight_recovery rec;
	struct vhost_inflight_queue *inf = NULL;
	struct vhost_vq vq;
	uint8_t hdr[4];
	uint16_t num, base;
	size_t inf_size;

	setup_once();
	fuzz_take(&data, &size, hdr, sizeof(hdr));
	num = (uint16_t)(1u << (hdr[1] % 9));
	base = (uint16_t)(hdr[2] | hdr[3] << 8);
	inf_size = vhost_inflight_queue_size(num);
	if (hdr[0] & 4) {
		inf = malloc(inf_size);
		fuzz_take(&data, &size, inf, inf_size);
	}
	fuzz_take(&data, &size, ram, 2 * REGION);

	memset(&vq, 0, sizeof(vq));
	vq.num = num;
	vq.event_idx = hdr[0] & 1;
	vq.indirect = hdr[0] & 2;
	vq.mem = &mem;
	vq.desc = vhost_mem_uva(&mem, UVA, 16u * num);
	vq.avail = vhost_mem_uva(&mem, UVA + 0x1000, 6u + 2u * num);
	vq.used = vhost_mem_uva(&mem, UVA + 0x2000, 6u + 8u * num);
	vq.batch = batch;
	vq.last_avail_idx = base;
	if (hdr[0] & 8) {
		vq.log = &log;
		vq.log_used = true;
		vq.used_gpa = 0x2000;
	}
	vq.used_idx = vq.published_idx = vq.used->idx;
	if (inf) {
		vhost_inflight_recover(inf, num, 0, (const volatile uint32_t *)vq.used->ring,
				       vq.used->idx, vq.avail->idx, base, resubmit, &rec);
		if (rec.nresubmit > num)
			abort(); /* recovery must never claim more than the ring */
		vq.inflight = inf;
		vq.last_avail_idx = rec.last_avail_idx;
		vq.counter = rec.next_counter - 1;
	}
	run_queue(&vq);
	free(inf);
	return 0;
}
