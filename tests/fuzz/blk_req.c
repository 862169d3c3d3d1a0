// SPDX-License-Identifier: MIT
/*
 * Fuzz target: vmig-blk's virtio-blk requests from a hostile guest
 * (tools/vmig-blk/blk.c, dwz.c and dirty.c): the request header (type, sector), how
 * a chain splits into header, data and status, read and write lengths and
 * their bounds against the disk, flush, get-id, and the segments of discard
 * and write-zeroes. The ring walk itself is lib/vhost's and has a target of
 * its own (virtq.c): here the rings are well formed and the requests are
 * not.
 *
 * The daemon's own data path runs: vblk_process_avail, as the queue thread
 * calls it, on a RAM disk (vmig-blk --ram, here an allocation of exactly the
 * disk's size, so ASan sees any access past its end) or the null disk
 * (--null). Neither back-end submits to io_uring, so no thread or ring is
 * needed. Requests are posted one at a time, and after each the target
 * checks what the daemon did against a model of virtio-blk written here:
 *  - exactly one used entry, for the head posted, with the length the
 *    request type gives; a completed request lay wholly in guest memory;
 *  - guest memory changed only in device-writable buffers and the used
 *    ring; with dirty logging on, every page changed is logged;
 *  - the status: OK only for a request inside the disk in whole logical
 *    blocks (and not a write to a read-only disk), IOERR or UNSUPP as the
 *    spec and vmig-blk's limits say otherwise;
 *  - the disk changed only by a successful write, discard or write-zeroes,
 *    only inside its range, with what was written (zeros for the other two);
 *  - a successful read returns the disk's bytes (the null disk: zeros or
 *    the buffer untouched), get-id the serial;
 *  - with dirty-block tracking on, every granule the request changed is
 *    marked, and none it could not have changed.
 *
 * Input: byte 0 = disk flags (bit 0 the null back-end, else RAM; bit 1
 * read-only; bit 2 read_zeroes; bit 3 4 KiB logical blocks, else 512; bit 4
 * EVENT_IDX; bit 5 dirty logging; bit 6 dirty-block tracking, in 64 KiB
 * granules with bit 7, else 4 KiB), byte 1 = the disk size in 4 KiB units,
 * less one (mod 64). Then requests, each: a flags byte (bit 0: through an
 * indirect table), a descriptor count (0 counts as 1), then per descriptor:
 * a flags byte (bit 0 device-writable, bit 1 an address follows), a length
 * (16 bits LE), the address if bit 1 (32 bits LE, guest physical; otherwise
 * the buffer takes the next free bytes of the buffer area), and for a
 * device-readable buffer a content length (8 bits) and that many bytes. The
 * rest of a readable buffer is a pattern; a writable one is filled with
 * 0xa5. The virtio-blk header is the first 16 readable bytes: type (32 bits
 * LE), ioprio, sector (64 bits LE). Missing bytes are zero.
 *
 * Guest memory: two adjacent 64 KiB regions at guest physical 0, with the
 * descriptor table at 0x0000, the avail ring at 0x1000, the used ring at
 * 0x2000 (256 entries) and buffers from 0x3000.
 */
#include <linux/virtio_blk.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "util/util.h"
#include "vmig-blk/req.h"

#include "fuzz.h"
#include "guestmem.h"

#define REGION FUZZ_REGION
#define MEM_SIZE FUZZ_MEM_SIZE
#define UVA FUZZ_UVA
#define NUM 256u
#define AVAIL_GPA 0x1000u
#define USED_GPA 0x2000u
#define USED_END (USED_GPA + 4u + 8u * NUM + 2u)
#define BUF_GPA 0x3000u
#define MAX_REQS 32u
#define MAX_DESCS 255u
#define POISON 0xa5
#define HDR_LEN 16u
#define SERIAL "vmig-fuzz-serial-42"
#define MAX_DISK (64u * 4096)

struct input {
	const uint8_t *p;
	size_t left;
};

/* One buffer of the request as posted. */
struct buf {
	uint64_t gpa;
	uint32_t len;
	bool writable;
};

/* The request as posted, and what the model derives from it. */
struct request {
	struct buf bufs[MAX_DESCS];
	unsigned n;
	bool raw;		 /* some buffer at an address from the input */
	uint64_t readable_total; /* bytes */
	uint64_t writable_total;
	uint8_t front[HDR_LEN + sizeof(struct vblk_dwz_seg) * VBLK_MAX_DWZ_SEGS + 1];
	uint64_t front_len; /* the first readable bytes, as the device saw them */
	uint32_t type;
	uint64_t sector;
};

static struct vhost_mem mem;
static uint8_t *ram; /* guest memory */
static uint8_t mem_before[MEM_SIZE];
/* The writable buffers as +1/-1 at their edges, and which 64-byte blocks
 * hold an edge; both all zero between requests. */
static int16_t writable_delta[MEM_SIZE + 1];
static bool edge_block[MEM_SIZE / 64 + 1];
static uint8_t log_bits[MEM_SIZE / VHOST_LOG_PAGE / 8];
static struct vhost_log dirty_log = {.bits = log_bits, .size = sizeof(log_bits), .fd = -1};
static struct vblk_req *reqs;
static struct iovec *iov_pool;
static uint64_t *gpa_pool;
static uint16_t batch[NUM];
static uint8_t disk_pattern[MAX_DISK]; /* what a disk holds at the start */
static uint8_t disk_before[MAX_DISK];

static void setup_once(void)
{
	if (ram)
		return;
	ram = fuzz_guest_mem(&mem, "fuzz-blk-req");
	/* What queue_alloc gives a queue of NUM entries. */
	reqs = calloc(NUM, sizeof(*reqs));
	iov_pool = calloc((size_t)NUM * VBLK_MAX_IOV, sizeof(*iov_pool));
	gpa_pool = calloc((size_t)NUM * VBLK_MAX_IOV, sizeof(*gpa_pool));
	if (!reqs || !iov_pool || !gpa_pool)
		abort();
	for (uint32_t i = 0; i < MAX_DISK; i++)
		disk_pattern[i] = (uint8_t)(i * 13 + (i >> 9) + 1);
}

static uint64_t take(struct input *in, unsigned bytes)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < bytes; i++, in->p++, in->left--) {
		if (!in->left)
			break;
		v |= (uint64_t)*in->p << (8 * i);
	}
	return v;
}

static uint64_t le_at(const uint8_t *p, unsigned bytes)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < bytes; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

/* Writes into guest memory, clipped to it. */
static void guest_write(uint64_t gpa, const void *src, uint64_t len)
{
	if (gpa >= MEM_SIZE)
		return;
	memcpy(ram + gpa, src, (size_t)VMIG_MIN(len, MEM_SIZE - gpa));
}

NO_COVERAGE static void fill_buffer(struct input *in, const struct buf *b)
{
	uint64_t end = VMIG_MIN(b->gpa + b->len, (uint64_t)MEM_SIZE);
	unsigned content = 0;

	if (!b->writable) {
		content = (unsigned)take(in, 1);
		content = (unsigned)VMIG_MIN((uint64_t)content, in->left);
	}
	for (uint64_t g = b->gpa, k = 0; g < end; g++, k++)
		ram[g] = b->writable ? POISON : k < content ? in->p[k] : (uint8_t)(g * 7 + 3);
	in->p += content;
	in->left -= content;
}

/* Reads the request's descriptors from the input and fills its buffers. */
static void parse_request(struct input *in, struct request *r, uint64_t *cursor)
{
	memset(r, 0, sizeof(*r));
	r->n = (unsigned)take(in, 1);
	if (!r->n)
		r->n = 1;
	for (unsigned i = 0; i < r->n; i++) {
		struct buf *b = &r->bufs[i];
		uint8_t flags = (uint8_t)take(in, 1);

		b->writable = flags & 1;
		b->len = (uint32_t)take(in, 2);
		if (flags & 2) {
			b->gpa = take(in, 4);
			r->raw = true;
		} else {
			b->gpa = *cursor;
			*cursor += b->len;
		}
		fill_buffer(in, b);
		if (b->writable)
			r->writable_total += b->len;
		else
			r->readable_total += b->len;
	}
}

/* Posts r (head, then its descriptors directly or in a table at *cursor). */
static void post_request(struct vhost_vq *vq, const struct request *r, bool indirect, uint16_t head,
			 uint64_t table_gpa)
{
	volatile struct vhost_desc *desc = vq->desc;

	for (unsigned i = 0; i < r->n; i++) {
		struct vhost_desc d = {
		    .addr = r->bufs[i].gpa,
		    .len = r->bufs[i].len,
		    .flags = (uint16_t)((r->bufs[i].writable ? VHOST_DESC_F_WRITE : 0) |
					(i + 1 < r->n ? VHOST_DESC_F_NEXT : 0)),
		    .next = (uint16_t)(indirect ? i + 1 : (head + i + 1) % NUM),
		};

		if (indirect)
			guest_write(table_gpa + i * sizeof(d), &d, sizeof(d));
		else
			memcpy((void *)(uintptr_t)&desc[(head + i) % NUM], &d, sizeof(d));
	}
	if (indirect) {
		struct vhost_desc d = {table_gpa, r->n * (uint32_t)sizeof(d), VHOST_DESC_F_INDIRECT,
				       0};

		memcpy((void *)(uintptr_t)&desc[head], &d, sizeof(d));
	}
	vq->avail->ring[vq->last_avail_idx % NUM] = head;
	__atomic_store_n(&vq->avail->idx, (uint16_t)(vq->last_avail_idx + 1), __ATOMIC_RELEASE);
}

/* The first readable bytes as the device reads them (guest memory before
 * it ran), for the header and the discard / write-zeroes segments. */
NO_COVERAGE static void gather_front(struct request *r)
{
	for (unsigned i = 0; i < r->n && r->front_len < sizeof(r->front); i++) {
		const struct buf *b = &r->bufs[i];
		uint64_t c = VMIG_MIN((uint64_t)b->len, sizeof(r->front) - r->front_len);

		if (b->writable || b->gpa + c > MEM_SIZE)
			continue;
		memcpy(r->front + r->front_len, mem_before + b->gpa, (size_t)c);
		r->front_len += c;
	}
	r->type = (uint32_t)le_at(r->front, 4);
	r->sector = le_at(r->front + 8, 8);
}

/* Is [sector, + bytes) inside the disk, in whole logical blocks? Written
 * apart from range_ok, in 128 bits. */
NO_COVERAGE static bool in_disk(const struct vblk_disk *disk, uint64_t sector, uint64_t bytes)
{
	unsigned __int128 start = (unsigned __int128)sector * VBLK_SECTOR;

	return start + bytes <= disk->size && start % disk->block_size == 0 &&
	       bytes % disk->block_size == 0;
}

/* The status virtio-blk and vmig-blk's advertised limits give r. */
NO_COVERAGE static uint8_t expected_status(const struct vblk_disk *disk, const struct request *r)
{
	uint64_t out_data = r->readable_total - HDR_LEN;

	switch (r->type) {
	case VIRTIO_BLK_T_IN:
		return in_disk(disk, r->sector, r->writable_total - 1) ? VIRTIO_BLK_S_OK
								       : VIRTIO_BLK_S_IOERR;
	case VIRTIO_BLK_T_OUT:
		return in_disk(disk, r->sector, out_data) && !disk->read_only ? VIRTIO_BLK_S_OK
									      : VIRTIO_BLK_S_IOERR;
	case VIRTIO_BLK_T_FLUSH:
	case VIRTIO_BLK_T_GET_ID:
		return VIRTIO_BLK_S_OK;
	case VIRTIO_BLK_T_DISCARD:
	case VIRTIO_BLK_T_WRITE_ZEROES:
		if (disk->read_only)
			return VIRTIO_BLK_S_IOERR;
		if (out_data == 0 || out_data > VBLK_MAX_DWZ_SEGS * 16 || out_data % 16)
			return VIRTIO_BLK_S_UNSUPP;
		for (uint64_t off = HDR_LEN; off < r->readable_total; off += 16) {
			uint32_t num = (uint32_t)le_at(r->front + off + 8, 4);
			uint32_t flags = (uint32_t)le_at(r->front + off + 12, 4);
			uint32_t allowed = r->type == VIRTIO_BLK_T_DISCARD
					       ? 0
					       : VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

			if (flags & ~allowed)
				return VIRTIO_BLK_S_UNSUPP;
			if (num > VBLK_MAX_DWZ_SECTORS ||
			    !in_disk(disk, le_at(r->front + off, 8), (uint64_t)num * VBLK_SECTOR))
				return VIRTIO_BLK_S_IOERR;
		}
		return VIRTIO_BLK_S_OK;
	default:
		return VIRTIO_BLK_S_UNSUPP;
	}
}

/* The guest's bytes that changed lie in writable buffers or the used ring,
 * and are logged when logging is on. */
NO_COVERAGE static void check_guest_memory(const struct request *r, bool logging)
{
	int32_t depth = 0;

	for (unsigned i = 0; i < r->n; i++) {
		const struct buf *b = &r->bufs[i];
		uint64_t end = VMIG_MIN(b->gpa + b->len, (uint64_t)MEM_SIZE);

		if (!b->writable || b->gpa >= MEM_SIZE || !b->len)
			continue;
		writable_delta[b->gpa]++;
		writable_delta[end]--;
		edge_block[b->gpa / 64] = edge_block[end / 64] = true;
	}
	for (uint32_t base = 0; base < MEM_SIZE; base += 64) {
		if (!edge_block[base / 64] && !memcmp(ram + base, mem_before + base, 64))
			continue;
		for (uint32_t g = base; g < base + 64; g++) {
			depth += writable_delta[g];
			if (ram[g] == mem_before[g])
				continue;
			CHECK(depth > 0 || (g >= USED_GPA && g < USED_END));
			if (logging)
				CHECK(log_bits[g / VHOST_LOG_PAGE / 8] &
				      (1u << (g / VHOST_LOG_PAGE % 8)));
		}
	}
	for (unsigned i = 0; i < r->n; i++) {
		const struct buf *b = &r->bufs[i];
		uint64_t end = VMIG_MIN(b->gpa + b->len, (uint64_t)MEM_SIZE);

		if (!b->writable || b->gpa >= MEM_SIZE)
			continue;
		writable_delta[b->gpa] = writable_delta[end] = 0;
		edge_block[b->gpa / 64] = edge_block[end / 64] = false;
	}
}

/* Writable buffers that overlap each other or the used ring: what the
 * device wrote into one may be overwritten by the next, so their contents
 * are not checked. */
NO_COVERAGE static bool writable_overlap(const struct request *r)
{
	for (unsigned i = 0; r->raw && i < r->n; i++) {
		const struct buf *a = &r->bufs[i];

		if (!a->writable)
			continue;
		if (a->gpa < USED_END && a->gpa + a->len > USED_GPA)
			return true;
		for (unsigned j = i + 1; j < r->n; j++) {
			const struct buf *b = &r->bufs[j];

			if (b->writable && a->gpa < b->gpa + b->len && b->gpa < a->gpa + a->len)
				return true;
		}
	}
	return false;
}

/* Compares the writable stream (all but the status byte) with want, or
 * with zeros (want NULL), or with its own bytes before (unchanged). */
NO_COVERAGE static void check_read_data(const struct request *r, const uint8_t *want, uint64_t len,
					bool unchanged)
{
	uint64_t k = 0;

	for (unsigned i = 0; i < r->n && k < len; i++) {
		const struct buf *b = &r->bufs[i];
		uint64_t c;

		if (!b->writable)
			continue;
		c = VMIG_MIN((uint64_t)b->len, len - k);
		for (uint64_t j = 0; j < c; j++) {
			uint8_t expect = unchanged ? mem_before[b->gpa + j]
					 : want	   ? want[k + j]
						   : 0;

			CHECK(ram[b->gpa + j] == expect);
		}
		k += c;
	}
}

/* A successful write put the readable data after the header at its sector. */
NO_COVERAGE static void check_written_data(const struct request *r, const uint8_t *disk)
{
	const uint8_t *dst = disk + r->sector * VBLK_SECTOR;
	uint64_t k = 0; /* position in the readable stream */

	for (unsigned i = 0; i < r->n; i++) {
		const struct buf *b = &r->bufs[i];
		uint64_t skip;

		if (b->writable)
			continue;
		skip = k < HDR_LEN ? VMIG_MIN(HDR_LEN - k, (uint64_t)b->len) : 0;
		if (b->len > skip)
			CHECK(!memcmp(dst + k + skip - HDR_LEN, mem_before + b->gpa + skip,
				      b->len - skip));
		k += b->len;
	}
}

/* Bytes of the disk that changed must be inside [lo, hi) or, for discard
 * and write-zeroes, inside a segment and zero now. */
NO_COVERAGE static void check_disk(const struct vblk_disk *disk, const uint8_t *before,
				   const struct request *r, uint8_t status)
{
	bool may_change = status == VIRTIO_BLK_S_OK && disk->ram && !disk->read_only;
	bool dwz = r->type == VIRTIO_BLK_T_DISCARD || r->type == VIRTIO_BLK_T_WRITE_ZEROES;

	if (!disk->ram || !memcmp(disk->ram, before, disk->size))
		goto segs;
	CHECK(may_change && (r->type == VIRTIO_BLK_T_OUT || dwz));
	for (uint64_t i = 0; i < disk->size; i++) {
		bool inside = false;

		if (disk->ram[i] == before[i])
			continue;
		if (r->type == VIRTIO_BLK_T_OUT)
			inside = i >= r->sector * VBLK_SECTOR &&
				 i - r->sector * VBLK_SECTOR < r->readable_total - HDR_LEN;
		for (uint64_t off = HDR_LEN; dwz && off < r->readable_total; off += 16) {
			uint64_t s = le_at(r->front + off, 8) * VBLK_SECTOR;

			inside |= i >= s && i - s < le_at(r->front + off + 8, 4) * VBLK_SECTOR;
		}
		CHECK(inside);
	}
segs:
	if (!may_change)
		return;
	if (r->type == VIRTIO_BLK_T_OUT)
		check_written_data(r, disk->ram);
	for (uint64_t off = HDR_LEN; dwz && off < r->readable_total; off += 16) {
		uint64_t s = le_at(r->front + off, 8) * VBLK_SECTOR;
		uint64_t n = le_at(r->front + off + 8, 4) * VBLK_SECTOR;

		for (uint64_t i = 0; i < n; i++)
			CHECK(disk->ram[s + i] == 0);
	}
}

static bool overlap(uint64_t a, uint64_t a_len, uint64_t b, uint64_t b_len)
{
	return a_len && b_len && a < b + b_len && b < a + a_len;
}

/* Dirty-block tracking (cleared before each request): every granule whose
 * bytes changed is marked, and a marked granule meets what the request
 * could change (ok: it completed with OK). */
NO_COVERAGE static void check_dirty(const struct vblk_disk *disk, const uint8_t *before,
				    const struct request *r, bool ok)
{
	const struct vblk_dirty *d = disk->dirty;
	bool dwz = r->type == VIRTIO_BLK_T_DISCARD || r->type == VIRTIO_BLK_T_WRITE_ZEROES;

	for (uint64_t g = 0; g < d->nbits; g++) {
		uint64_t lo = g << d->shift,
			 len = VMIG_MIN((uint64_t)d->granularity, disk->size - lo);
		bool set = d->words[g / 64] >> (g % 64) & 1, may = false;

		if (disk->ram && memcmp(disk->ram + lo, before + lo, len))
			CHECK(set); /* a change the copier would never see */
		if (!set)
			continue;
		if (ok && r->type == VIRTIO_BLK_T_OUT)
			may =
			    overlap(lo, len, r->sector * VBLK_SECTOR, r->readable_total - HDR_LEN);
		for (uint64_t off = HDR_LEN; ok && dwz && off < r->readable_total; off += 16)
			may |= overlap(lo, len, le_at(r->front + off, 8) * VBLK_SECTOR,
				       le_at(r->front + off + 8, 4) * VBLK_SECTOR);
		CHECK(may);
	}
}

/* What a retired request (status written) must have done. */
NO_COVERAGE static void check_retired(const struct vblk_disk *disk, const uint8_t *before,
				      const struct request *r, uint32_t used_len)
{
	const struct buf *last = NULL;
	uint8_t status, want = expected_status(disk, r);
	uint64_t data_len = r->writable_total - 1;
	bool clean = !writable_overlap(r);

	for (unsigned i = 0; i < r->n; i++) {
		/* a completed request's buffers were all in guest memory
		 * (an empty one maps to nothing, wherever it points) */
		CHECK(!r->bufs[i].len || r->bufs[i].gpa + r->bufs[i].len <= MEM_SIZE);
		if (r->bufs[i].writable && r->bufs[i].len)
			last = &r->bufs[i];
	}
	CHECK(last && r->readable_total >= HDR_LEN);
	status = ram[last->gpa + last->len - 1];
	/* the used entry, written after the status, may cover it */
	if (last->gpa + last->len - 1 < USED_GPA || last->gpa + last->len - 1 >= USED_END)
		CHECK(status == want);
	if (r->type == VIRTIO_BLK_T_IN && want == VIRTIO_BLK_S_OK)
		CHECK(used_len == r->writable_total);
	else if (r->type == VIRTIO_BLK_T_GET_ID)
		CHECK(used_len == VMIG_MIN(data_len, (uint64_t)VBLK_SERIAL_LEN) + 1);
	else
		CHECK(used_len == 1);
	check_disk(disk, before, r, want);
	if (disk->dirty)
		check_dirty(disk, before, r, want == VIRTIO_BLK_S_OK);
	if (!clean || want != VIRTIO_BLK_S_OK)
		return;
	if (r->type == VIRTIO_BLK_T_IN && disk->ram)
		check_read_data(r, disk->ram + r->sector * VBLK_SECTOR, data_len, false);
	else if (r->type == VIRTIO_BLK_T_IN)
		check_read_data(r, NULL, data_len, !disk->read_zeroes);
	else if (r->type == VIRTIO_BLK_T_GET_ID)
		check_read_data(r, (const uint8_t *)disk->serial,
				VMIG_MIN(data_len, (uint64_t)VBLK_SERIAL_LEN), false);
}

/*
 * Posts one request from the input, lets the daemon take it, and checks the
 * outcome. Returns false when the input is used up, or when the request let
 * the device write into the rings themselves (a guest may do that; the
 * queue's state is then its own business, not something to check).
 */
static bool run_request(struct vblk_queue *q, struct input *in)
{
	static struct request r;
	struct vhost_vq *vq = &q->vr->vq;
	uint16_t head = (uint16_t)(vq->last_avail_idx * 7 % NUM), used_idx = vq->used_idx;
	bool indirect = take(in, 1) & 1, ring_hit = false;
	uint64_t cursor = BUF_GPA, table_gpa = BUF_GPA;
	uint32_t used_len;
	unsigned started;

	if (!in->left)
		return false;
	if (indirect)
		cursor += 16 * MAX_DESCS;
	parse_request(in, &r, &cursor);
	post_request(vq, &r, indirect, head, table_gpa);
	for (unsigned i = 0; i < r.n; i++)
		ring_hit |= r.bufs[i].writable && r.bufs[i].gpa < USED_GPA && r.bufs[i].len;
	memcpy(mem_before, ram, MEM_SIZE);
	gather_front(&r);
	if (q->disk->ram)
		memcpy(disk_before, q->disk->ram, q->disk->size);
	memset(log_bits, 0, sizeof(log_bits));
	if (q->disk->dirty)
		memset(q->disk->dirty->words, 0, q->disk->dirty->nwords * sizeof(uint64_t));

	started = vblk_process_avail(q);
	vhost_vq_flush(vq); /* what the queue thread's pass ends with */
	if (ring_hit)
		return false;

	CHECK(started == 1 && !vq->broken);
	CHECK(vq->used->idx == (uint16_t)(used_idx + 1));
	CHECK(vq->used->ring[used_idx % NUM].id == head);
	used_len = vq->used->ring[used_idx % NUM].len;
	CHECK(used_len <= r.writable_total);
	check_guest_memory(&r, vq->log != NULL);
	if (used_len)
		check_retired(q->disk, disk_before, &r, used_len);
	else if (q->disk->ram) /* dropped: nothing done */
		CHECK(!memcmp(q->disk->ram, disk_before, q->disk->size));
	if (!used_len && q->disk->dirty)
		check_dirty(q->disk, disk_before, &r, false);
	return true;
}

static void setup_queue(struct vblk_queue *q, struct vhost_vring *vr, struct vblk_disk *disk,
			uint8_t flags)
{
	struct vhost_vq *vq = &vr->vq;

	memset(vr, 0, sizeof(*vr));
	vr->num = NUM;
	vr->kick_fd = vr->call_fd = vr->err_fd = -1;
	vq->num = NUM;
	vq->event_idx = flags & 0x10;
	vq->indirect = true;
	vq->mem = &mem;
	vq->desc = vhost_mem_uva(&mem, UVA, 16u * NUM);
	vq->avail = vhost_mem_uva(&mem, UVA + AVAIL_GPA, 6u + 2u * NUM);
	vq->used = vhost_mem_uva(&mem, UVA + USED_GPA, 6u + 8u * NUM);
	vq->batch = batch;
	if (flags & 0x20) {
		vq->log = &dirty_log;
		vq->log_used = true;
		vq->used_gpa = USED_GPA;
	}
	vblk_queue_init(q, disk, 0);
	memset(reqs, 0, NUM * sizeof(*reqs));
	for (unsigned i = 0; i < NUM; i++) {
		reqs[i].q = q;
		reqs[i].chain.iov = &iov_pool[(size_t)i * VBLK_MAX_IOV];
		reqs[i].chain.gpa = &gpa_pool[(size_t)i * VBLK_MAX_IOV];
		reqs[i].chain.max = VBLK_MAX_IOV;
	}
	q->reqs = reqs;
	q->alloc_num = NUM;
	q->vr = vr;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = {data, size};
	struct vblk_disk disk = {.fd = -1, .lock_fd = -1, .mem_align = 1};
	struct vhost_vring vr;
	struct vblk_queue q;
	uint8_t flags = (uint8_t)take(&in, 1);

	setup_once();
	disk.size = (take(&in, 1) % (MAX_DISK / 4096) + 1) * 4096;
	disk.backend = flags & 1 ? VBLK_BACKEND_NULL : VBLK_BACKEND_RAM;
	disk.read_only = flags & 2;
	disk.read_zeroes = flags & 4;
	disk.block_size = disk.physical_block_size = flags & 8 ? 4096 : VBLK_SECTOR;
	memcpy(disk.serial, SERIAL, sizeof(disk.serial));
	if (disk.backend == VBLK_BACKEND_RAM) {
		disk.ram = malloc(disk.size); /* exactly: ASan sees past its end */
		if (!disk.ram)
			abort();
		memcpy(disk.ram, disk_pattern, disk.size);
	}
	if ((flags & 0x40) &&
	    vblk_dirty_new(disk.size, flags & 0x80 ? 64u << 10 : 4096u, false, &disk.dirty))
		abort();
	memset(ram, 0, MEM_SIZE);
	setup_queue(&q, &vr, &disk, flags);
	for (unsigned i = 0; i < MAX_REQS && run_request(&q, &in); i++)
		;
	vblk_dirty_free(disk.dirty);
	free(disk.ram);
	return 0;
}
