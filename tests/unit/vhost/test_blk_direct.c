// SPDX-License-Identifier: MIT
/*
 * Unit tests of vmig-blk's O_DIRECT data path (--cache none) on a real block
 * device: a loop device with direct I/O that each test makes itself
 * (losetup -f --show --direct-io=on, on a file in /var/tmp) and removes
 * again, whatever happened. The queue thread (tools/vmig-blk/blk.c) serves a
 * ring in the harness's fake guest RAM, with the disk opened O_DIRECT and
 * its geometry probed as the daemon does (vblk_disk_probe, disk.c). What is
 * checked:
 * - aligned requests go to the device as they are, and data round-trips;
 * - guest buffers O_DIRECT cannot take (a header and data in one
 *   descriptor, odd lengths and addresses, a buffer across two memory
 *   regions, more than one bounce buffer long) are bounced, and round-trip;
 * - more misaligned requests than bounce buffers wait for one and complete;
 * - with 4096-byte logical blocks (losetup --sector-size 4096) the guest is
 *   told so, and requests not aligned to them fail with IOERR, nothing else;
 * - discard and write-zeroes reach the device as discard, write-zeroes that
 *   may unmap, and write-zeroes that may not (seen in the loop device's
 *   backing file: blocks freed, or kept).
 * It needs root (losetup) and fails, not skips, without it.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/virtio_blk.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>

#include "harness.h"
#include "vmig-blk/blk.h"

#define T_RING 32
#define T_BACKING_SIZE (8u << 20)
#define T_HDR (H_DATA)		  /* request headers, 16 bytes apart */
#define T_STATUS (H_DATA + 0x800) /* status bytes, one per request */
#define T_BUF (H_DATA + 0x10000)  /* data from here: 64 KiB .. 2 MiB */
#define T_ZEROS 0x10000u	  /* device_is(): all zero, not a pattern */

/* Chain layouts post() makes besides header, data, status. */
#define HDR_IN_DATA 1u	  /* the first data piece starts with the header */
#define STATUS_IN_DATA 2u /* the last data piece ends with the status byte */

struct fixture {
	char backing[64];
	char dev[64];
	int dev_fd;  /* the daemon's: O_DIRECT */
	int peek_fd; /* the test's own O_DIRECT view of the device */
	struct harness h;
	struct vblk_disk disk;
	struct vblk_queue q[2]; /* q[1] stays empty: get_config counts queues */
	struct vhost_vring vr;
	uint16_t used_want;
};

/* A piece of a descriptor chain: guest address, length, device-writable. */
struct seg {
	uint64_t gpa;
	uint32_t len;
	bool dev_writes;
};

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Run cmd, and read the first line of its output into out (if out). */
static int run_cmd(const char *cmd, char *out, size_t outlen)
{
	FILE *p = popen(cmd, "r");
	char line[256] = "";

	if (!p)
		return -1;
	if (!fgets(line, sizeof(line), p))
		line[0] = '\0';
	if (pclose(p) != 0)
		return -1;
	line[strcspn(line, "\n")] = '\0';
	if (out)
		snprintf(out, outlen, "%s", line);
	return 0;
}

static void loop_detach(struct fixture *f)
{
	char cmd[128];

	if (!f->dev[0])
		return;
	snprintf(cmd, sizeof(cmd), "losetup -d %s", f->dev);
	if (run_cmd(cmd, NULL, 0))
		fprintf(stderr, "warning: '%s' failed\n", cmd);
	f->dev[0] = '\0';
}

/* The fixture's loop device, over a fresh backing file, opened O_DIRECT
 * and probed; the queue runs on it. -1 (the test fails) if any step does. */
static int setup_loop(void **state, unsigned sector_size)
{
	struct fixture *f = calloc(1, sizeof(*f));
	char cmd[256], err[256];
	int fd;

	*state = f;
	if (!f)
		return -1;
	f->dev_fd = f->peek_fd = -1;
	if (geteuid() != 0) {
		fprintf(stderr, "test_blk_direct needs root to create loop devices\n");
		return -1;
	}
	snprintf(f->backing, sizeof(f->backing), "/var/tmp/vmig-blk-direct.XXXXXX");
	fd = mkstemp(f->backing);
	if (fd < 0 || ftruncate(fd, T_BACKING_SIZE) < 0) {
		fprintf(stderr, "backing file %s: %s\n", f->backing, strerror(errno));
		return -1;
	}
	close(fd);
	if (sector_size)
		snprintf(cmd, sizeof(cmd), "losetup -f --show --direct-io=on --sector-size %u %s",
			 sector_size, f->backing);
	else
		snprintf(cmd, sizeof(cmd), "losetup -f --show --direct-io=on %s", f->backing);
	if (run_cmd(cmd, f->dev, sizeof(f->dev)) || strncmp(f->dev, "/dev/loop", 9)) {
		fprintf(stderr, "'%s' failed (%s)\n", cmd, f->dev);
		f->dev[0] = '\0';
		return -1;
	}
	f->dev_fd = open(f->dev, O_RDWR | O_DIRECT | O_CLOEXEC);
	f->peek_fd = open(f->dev, O_RDWR | O_DIRECT | O_CLOEXEC);
	if (f->dev_fd < 0 || f->peek_fd < 0) {
		fprintf(stderr, "open %s O_DIRECT: %s\n", f->dev, strerror(errno));
		return -1;
	}
	f->disk = (struct vblk_disk){.backend = VBLK_BACKEND_FILE,
				     .fd = f->dev_fd,
				     .is_blkdev = true,
				     .direct = true,
				     .lock_fd = -1};
	if (ioctl(f->dev_fd, BLKGETSIZE64, &f->disk.size) < 0 ||
	    vblk_disk_probe(&f->disk, err, sizeof(err))) {
		fprintf(stderr, "probe %s: %s\n", f->dev, err);
		return -1;
	}
	h_init(&f->h, T_RING, false, false);
	vblk_queue_init(&f->q[0], &f->disk, 0);
	f->vr.idx = 0;
	f->vr.num = T_RING;
	f->vr.vq = f->h.vq;
	f->vr.kick_fd = eventfd(0, EFD_CLOEXEC);
	f->vr.call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	f->vr.err_fd = -1;
	if (f->vr.kick_fd < 0 || f->vr.call_fd < 0 || vblk_dev_ops.queue_start(f->q, &f->vr))
		return -1;
	return 0;
}

static int setup_512(void **state)
{
	return setup_loop(state, 0);
}

static int setup_4k(void **state)
{
	return setup_loop(state, 4096);
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	if (!f)
		return 0;
	if (f->q[0].running)
		vblk_dev_ops.queue_stop(f->q, &f->vr);
	vblk_queue_free(&f->q[0]);
	if (f->h.ram[0])
		h_free(&f->h);
	if (f->vr.kick_fd > 0)
		close(f->vr.kick_fd);
	if (f->vr.call_fd > 0)
		close(f->vr.call_fd);
	if (f->dev_fd >= 0)
		close(f->dev_fd);
	if (f->peek_fd >= 0)
		close(f->peek_fd);
	loop_detach(f);
	if (f->backing[0])
		unlink(f->backing);
	free(f);
	return 0;
}

static bool wait_used(struct fixture *f, uint16_t want, unsigned ms)
{
	uint64_t end = now_ms() + ms;

	while (now_ms() < end) {
		if (__atomic_load_n(&f->h.used->idx, __ATOMIC_ACQUIRE) == want)
			return true;
		usleep(200);
	}
	return false;
}

/* Post request number slot (0..7, descriptors from 4 * slot on) as one
 * chain: the header (16 bytes at its own address), the data pieces, a
 * status byte (its own descriptor), or another layout (HDR_IN_DATA,
 * STATUS_IN_DATA). Returns the status byte's guest address. No kick. */
static uint64_t post(struct fixture *f, unsigned slot, uint32_t type, uint64_t sector,
		     const struct seg *data, unsigned ndata, unsigned layout)
{
	uint64_t hdr_gpa = layout & HDR_IN_DATA ? data[0].gpa : T_HDR + 16u * slot;
	uint64_t st_gpa = T_STATUS + slot;
	struct virtio_blk_outhdr *hdr = h_gpa(&f->h, hdr_gpa);
	uint16_t d = (uint16_t)(slot * 4), head = d;

	if (layout & STATUS_IN_DATA)
		st_gpa = data[ndata - 1].gpa + data[ndata - 1].len - 1;
	hdr->type = type;
	hdr->ioprio = 0;
	hdr->sector = sector;
	*(uint8_t *)h_gpa(&f->h, st_gpa) = 0xee;
	if (!(layout & HDR_IN_DATA)) {
		h_set_desc(&f->h, f->h.desc, d, hdr_gpa, sizeof(*hdr), VHOST_DESC_F_NEXT, d + 1);
		d++;
	}
	for (unsigned i = 0; i < ndata; i++, d++) {
		bool last = i + 1 == ndata && (layout & STATUS_IN_DATA);

		h_set_desc(&f->h, f->h.desc, d, data[i].gpa, data[i].len,
			   (last ? 0 : VHOST_DESC_F_NEXT) |
			       (data[i].dev_writes ? VHOST_DESC_F_WRITE : 0),
			   last ? 0 : d + 1);
	}
	if (!(layout & STATUS_IN_DATA))
		h_set_desc(&f->h, f->h.desc, d, st_gpa, 1, VHOST_DESC_F_WRITE, 0);
	h_post(&f->h, head);
	return st_gpa;
}

/* Post one request, kick, wait for it; its status. */
static uint8_t run_req(struct fixture *f, uint32_t type, uint64_t sector, const struct seg *data,
		       unsigned ndata, unsigned layout)
{
	uint64_t st = post(f, 0, type, sector, data, ndata, layout);

	eventfd_write(f->vr.kick_fd, 1);
	f->used_want++;
	assert_true(wait_used(f, f->used_want, 10000));
	return *(volatile uint8_t *)h_gpa(&f->h, st);
}

static void fill(struct fixture *f, uint64_t gpa, uint64_t len, uint32_t seed)
{
	for (uint64_t i = 0; i < len; i++)
		*(uint8_t *)h_gpa(&f->h, gpa + i) = (uint8_t)((i * 7 + seed) ^ (i >> 9));
}

static bool matches(struct fixture *f, uint64_t gpa, uint64_t len, uint32_t seed)
{
	for (uint64_t i = 0; i < len; i++)
		if (*(uint8_t *)h_gpa(&f->h, gpa + i) != (uint8_t)((i * 7 + seed) ^ (i >> 9)))
			return false;
	return true;
}

/* The device's bytes at off (read by the test, O_DIRECT), against the
 * pattern, or against zeros if seed is T_ZEROS. */
static bool device_is(struct fixture *f, uint64_t off, uint64_t len, uint32_t seed)
{
	static uint8_t buf[1 << 20] __attribute__((aligned(4096)));
	uint64_t a = off & ~4095ull, n = ((off + len + 4095) & ~4095ull) - a;

	assert_true(n <= sizeof(buf));
	if (pread(f->peek_fd, buf, n, (off_t)a) != (ssize_t)n)
		return false;
	for (uint64_t i = 0; i < len; i++) {
		uint8_t want = seed == T_ZEROS ? 0 : (uint8_t)((i * 7 + seed) ^ (i >> 9));

		if (buf[off - a + i] != want)
			return false;
	}
	return true;
}

/* Stop the queue: its thread's own fields may be read from here on. */
static void stop_queue(struct fixture *f)
{
	vblk_dev_ops.queue_stop(f->q, &f->vr);
}

static uint64_t bounced(struct fixture *f)
{
	return __atomic_load_n(&f->q[0].bounced, __ATOMIC_RELAXED);
}

/* The device's geometry as the guest is told it. */
static void test_probe_and_config_512(void **state)
{
	struct fixture *f = *state;
	struct virtio_blk_config c;
	uint8_t cfg[VHOST_USER_CONFIG_MAX];

	assert_int_equal(f->disk.block_size, 512);
	assert_true(f->disk.mem_align >= 1 && f->disk.mem_align <= 512);
	assert_int_equal(f->disk.size, T_BACKING_SIZE);
	vblk_dev_ops.get_config(f->q, cfg);
	memcpy(&c, cfg, sizeof(c));
	assert_int_equal(c.blk_size, 512);
	assert_int_equal(c.capacity, T_BACKING_SIZE / 512);
	assert_int_equal(c.physical_block_exp, 0);
	assert_true(vblk_device_features(&f->disk, 1) & (1ull << VIRTIO_BLK_F_TOPOLOGY));
}

/* A file opened O_DIRECT is held to its file system's DIO alignment. */
static void test_probe_direct_file(void **state)
{
	struct fixture *f = *state;
	struct vblk_disk d = {.backend = VBLK_BACKEND_FILE, .direct = true, .size = 1u << 20};
	struct statx sx;
	char err[256];

	d.fd = open(f->backing, O_RDWR | O_DIRECT | O_CLOEXEC);
	assert_true(d.fd >= 0);
	assert_int_equal(vblk_disk_probe(&d, err, sizeof(err)), 0);
	assert_int_equal(statx(d.fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx), 0);
	if (sx.stx_mask & STATX_DIOALIGN) {
		assert_int_equal(d.block_size,
				 sx.stx_dio_offset_align > 512 ? sx.stx_dio_offset_align : 512);
		assert_int_equal(d.mem_align, sx.stx_dio_mem_align);
	} else {
		assert_int_equal(d.block_size, 512);
		assert_int_equal(d.mem_align, 4096);
	}
	/* Without O_DIRECT nothing constrains the guest's buffers. */
	d.direct = false;
	assert_int_equal(vblk_disk_probe(&d, err, sizeof(err)), 0);
	assert_int_equal(d.block_size, 512);
	assert_int_equal(d.mem_align, 1);
	close(d.fd);
}

/* Aligned buffers go to the device as they are; data round-trips. */
static void test_aligned_roundtrip(void **state)
{
	struct fixture *f = *state;
	struct seg w[2] = {{T_BUF, 4096, false}, {T_BUF + 0x2000, 8192, false}};
	struct seg r[1] = {{T_BUF + 0x10000, 12288, true}};

	fill(f, T_BUF, 4096, 1);
	fill(f, T_BUF + 0x2000, 8192, 2);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_OUT, 16, w, 2, 0), VIRTIO_BLK_S_OK);
	assert_true(device_is(f, 16 * 512, 4096, 1));
	assert_true(device_is(f, 16 * 512 + 4096, 8192, 2));
	memset(h_gpa(&f->h, T_BUF + 0x10000), 0, 12288);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_IN, 16, r, 1, 0), VIRTIO_BLK_S_OK);
	assert_true(memcmp(h_gpa(&f->h, T_BUF + 0x10000), h_gpa(&f->h, T_BUF), 4096) == 0);
	assert_true(matches(f, T_BUF + 0x10000 + 4096, 8192, 2));
	assert_int_equal(run_req(f, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0), VIRTIO_BLK_S_OK);
	assert_int_equal(bounced(f), 0);
	stop_queue(f);
	assert_int_equal(f->q[0].stats.errors, 0);
}

/* Buffers O_DIRECT cannot take are bounced, and the data is right. */
static void test_misaligned_bounced(void **state)
{
	struct fixture *f = *state;
	/* A header and 4 KiB of data in one descriptor: data at +16. */
	struct seg one[1] = {{T_BUF, 16 + 4096, false}};
	/* Odd pieces at odd addresses, 4 KiB in all. */
	struct seg odd[3] = {{T_BUF + 0x3001, 100, false},
			     {T_BUF + 0x5003, 3000, false},
			     {T_BUF + 0x7005, 996, false}};
	/* A read into a buffer 1 byte off, the status byte at the end of
	 * the same descriptor (the data is the 4 KiB before it). */
	struct seg rd[1] = {{T_BUF + 0x9001, 4096 + 1, true}};
	const uint64_t big = 600u << 10; /* three bounce chunks */
	/* 600 KiB across the two memory regions (the boundary at 1 MiB). */
	struct seg bw[1] = {{H_REGION - (300u << 10) + 8, (uint32_t)big, false}};
	struct seg br[1] = {{T_BUF + 0x20000 + 1, (uint32_t)big, true}};

	fill(f, T_BUF + 16, 4096, 3);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_OUT, 64, one, 1, HDR_IN_DATA), VIRTIO_BLK_S_OK);
	assert_true(device_is(f, 64 * 512, 4096, 3));
	assert_int_equal(bounced(f), 1);

	fill(f, T_BUF + 0x3001, 100, 4);
	for (unsigned i = 0; i < 3000; i++)
		*(uint8_t *)h_gpa(&f->h, T_BUF + 0x5003 + i) =
		    (uint8_t)(((i + 100) * 7 + 4) ^ ((i + 100) >> 9));
	for (unsigned i = 0; i < 996; i++)
		*(uint8_t *)h_gpa(&f->h, T_BUF + 0x7005 + i) =
		    (uint8_t)(((i + 3100) * 7 + 4) ^ ((i + 3100) >> 9));
	assert_int_equal(run_req(f, VIRTIO_BLK_T_OUT, 72, odd, 3, 0), VIRTIO_BLK_S_OK);
	assert_true(device_is(f, 72 * 512, 4096, 4));

	memset(h_gpa(&f->h, rd[0].gpa), 0, rd[0].len);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_IN, 64, rd, 1, STATUS_IN_DATA), VIRTIO_BLK_S_OK);
	assert_true(matches(f, rd[0].gpa, 4096, 3));
	assert_int_equal(f->h.used->ring[(f->used_want - 1) % T_RING].len, 4096 + 1);

	fill(f, bw[0].gpa, big, 5);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_OUT, 2048, bw, 1, 0), VIRTIO_BLK_S_OK);
	assert_true(device_is(f, 2048 * 512, big, 5));
	memset(h_gpa(&f->h, br[0].gpa), 0, big);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_IN, 2048, br, 1, 0), VIRTIO_BLK_S_OK);
	assert_true(matches(f, br[0].gpa, big, 5));
	assert_int_equal(bounced(f), 5);
	stop_queue(f);
	assert_int_equal(f->q[0].stats.errors, 0);
}

/* Eight misaligned writes posted at once, for four bounce buffers: the
 * last four wait for a buffer, and every one completes with its data. */
static void test_bounce_buffers_run_out(void **state)
{
	struct fixture *f = *state;
	const unsigned n = 8;
	uint64_t st[8];

	assert_true(n > VBLK_BOUNCE_SLOTS);
	for (unsigned i = 0; i < n; i++) {
		struct seg s = {T_BUF + i * 0x11000 + 1, 64u << 10, false};

		fill(f, s.gpa, s.len, 10 + i);
		st[i] = post(f, i, VIRTIO_BLK_T_OUT, 4096 + i * 128, &s, 1, 0);
	}
	eventfd_write(f->vr.kick_fd, 1);
	f->used_want += n;
	assert_true(wait_used(f, f->used_want, 10000));
	for (unsigned i = 0; i < n; i++) {
		assert_int_equal(*(volatile uint8_t *)h_gpa(&f->h, st[i]), VIRTIO_BLK_S_OK);
		assert_true(device_is(f, (4096 + i * 128) * 512ull, 64u << 10, 10 + i));
	}
	assert_int_equal(bounced(f), n);
	stop_queue(f);
	assert_int_equal(f->q[0].bounce.nwaiting, 0);
	assert_int_equal(f->q[0].bounce.free_mask, (1u << VBLK_BOUNCE_SLOTS) - 1);
}

static uint64_t backing_blocks(struct fixture *f)
{
	struct stat st;

	assert_int_equal(stat(f->backing, &st), 0);
	return (uint64_t)st.st_blocks;
}

static void dwz(struct fixture *f, uint32_t type, uint64_t sector, uint32_t num_sectors,
		uint32_t flags)
{
	struct virtio_blk_discard_write_zeroes *d = h_gpa(&f->h, T_BUF + 0x100000);
	struct seg s = {T_BUF + 0x100000, sizeof(*d), false};

	*d = (struct virtio_blk_discard_write_zeroes){
	    .sector = sector, .num_sectors = num_sectors, .flags = flags};
	assert_int_equal(run_req(f, type, 0, &s, 1, 0), VIRTIO_BLK_S_OK);
}

/* Kernel version as major * 100 + minor. */
static unsigned kernel_version(void)
{
	struct utsname u;
	unsigned major = 0, minor = 0;

	uname(&u);
	sscanf(u.release, "%u.%u", &major, &minor);
	return major * 100 + minor;
}

/*
 * Discard and write-zeroes on the device. The loop device passes them to
 * its backing file: a discard, and a write-zeroes that may unmap, punch a
 * hole there (blocks freed); a write-zeroes that may not unmap becomes
 * FALLOC_FL_ZERO_RANGE (blocks kept). All three read back as zeros.
 */
static void test_discard_write_zeroes(void **state)
{
	struct fixture *f = *state;
	const uint64_t mib = 1u << 20;
	struct seg w = {T_BUF, (uint32_t)(256u << 10), false};
	uint64_t blocks;

	/* 3 MiB of data at 1 MiB, written through the queue and flushed. */
	for (unsigned i = 0; i < 12; i++) {
		fill(f, T_BUF, w.len, 20 + i);
		assert_int_equal(run_req(f, VIRTIO_BLK_T_OUT, (mib + i * w.len) / 512, &w, 1, 0),
				 VIRTIO_BLK_S_OK);
	}
	assert_int_equal(run_req(f, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0), VIRTIO_BLK_S_OK);
	blocks = backing_blocks(f);
	assert_true(blocks >= 3 * mib / 512);

	/* Without UNMAP: zeros, and the blocks stay allocated. */
	dwz(f, VIRTIO_BLK_T_WRITE_ZEROES, mib / 512, 512, 0);
	assert_true(device_is(f, mib, 256u << 10, T_ZEROS));
	assert_true(device_is(f, mib + (256u << 10), 256u << 10, 21));
	assert_true(backing_blocks(f) >= blocks);

	/* With UNMAP: zeros, and the blocks are freed. */
	dwz(f, VIRTIO_BLK_T_WRITE_ZEROES, (mib + (512u << 10)) / 512, 512,
	    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
	assert_true(device_is(f, mib + (512u << 10), 256u << 10, T_ZEROS));
	assert_true(device_is(f, mib + (768u << 10), 256u << 10, 23));
	assert_true(backing_blocks(f) <= blocks - (256u << 10) / 512);
	blocks = backing_blocks(f);

	/* Discard: the loop device punches its backing file too. Through
	 * io_uring since Linux 6.12, else through the punch. */
	dwz(f, VIRTIO_BLK_T_DISCARD, 2 * mib / 512, 1024, 0);
	assert_true(backing_blocks(f) <= blocks - (512u << 10) / 512);
	assert_true(device_is(f, 2 * mib + (512u << 10), 256u << 10, 26));
	stop_queue(f);
	if (kernel_version() >= 612)
		assert_false(f->q[0].no_uring_discard);
	assert_int_equal(f->q[0].stats.discard_ops, 1);
	assert_int_equal(f->q[0].stats.write_zeroes_ops, 2);
	assert_int_equal(f->q[0].stats.errors, 0);
}

/* 4096-byte logical blocks: the guest is told, aligned requests work (and
 * misaligned memory is still bounced), the rest is IOERR and changes
 * nothing, and the queue goes on. */
static void test_4k_blocks(void **state)
{
	struct fixture *f = *state;
	struct virtio_blk_config c;
	uint8_t cfg[VHOST_USER_CONFIG_MAX];
	struct seg ok[1] = {{T_BUF, 8192, false}};
	struct seg half[1] = {{T_BUF, 512, false}};
	struct seg odd[1] = {{T_BUF + 0x4000 + 1, 4096, true}};
	struct seg r512[1] = {{T_BUF + 0x8000, 4096 + 512, true}};

	assert_int_equal(f->disk.block_size, 4096);
	vblk_dev_ops.get_config(f->q, cfg);
	memcpy(&c, cfg, sizeof(c));
	assert_int_equal(c.blk_size, 4096);
	assert_int_equal(c.capacity, T_BACKING_SIZE / 512);
	assert_int_equal(c.discard_sector_alignment, 8);

	fill(f, T_BUF, 8192, 40);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_OUT, 8, ok, 1, 0), VIRTIO_BLK_S_OK);
	assert_true(device_is(f, 4096, 8192, 40));
	/* Not at a 4 KiB offset, not 4 KiB long, or both. */
	assert_int_equal(run_req(f, VIRTIO_BLK_T_OUT, 9, ok, 1, 0), VIRTIO_BLK_S_IOERR);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_OUT, 8, half, 1, 0), VIRTIO_BLK_S_IOERR);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_IN, 8, r512, 1, 0), VIRTIO_BLK_S_IOERR);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_IN, 12, odd, 1, 0), VIRTIO_BLK_S_IOERR);
	{
		struct virtio_blk_discard_write_zeroes *d = h_gpa(&f->h, T_BUF + 0x100000);
		struct seg s = {T_BUF + 0x100000, sizeof(*d), false};

		*d = (struct virtio_blk_discard_write_zeroes){.sector = 8, .num_sectors = 4};
		assert_int_equal(run_req(f, VIRTIO_BLK_T_DISCARD, 0, &s, 1, 0), VIRTIO_BLK_S_IOERR);
		*d = (struct virtio_blk_discard_write_zeroes){.sector = 4, .num_sectors = 8};
		assert_int_equal(run_req(f, VIRTIO_BLK_T_WRITE_ZEROES, 0, &s, 1, 0),
				 VIRTIO_BLK_S_IOERR);
	}
	assert_true(device_is(f, 4096, 8192, 40)); /* nothing of it was done */
	/* Aligned on the disk, 1 byte off in memory: bounced. */
	memset(h_gpa(&f->h, odd[0].gpa), 0, 4096);
	assert_int_equal(run_req(f, VIRTIO_BLK_T_IN, 8, odd, 1, 0), VIRTIO_BLK_S_OK);
	assert_true(matches(f, odd[0].gpa, 4096, 40));
	assert_int_equal(bounced(f), 1);
	assert_false(__atomic_load_n(&f->q[0].broken, __ATOMIC_RELAXED));
	stop_queue(f);
	assert_int_equal(f->q[0].stats.errors, 6);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_probe_and_config_512, setup_512, teardown),
	    cmocka_unit_test_setup_teardown(test_probe_direct_file, setup_512, teardown),
	    cmocka_unit_test_setup_teardown(test_aligned_roundtrip, setup_512, teardown),
	    cmocka_unit_test_setup_teardown(test_misaligned_bounced, setup_512, teardown),
	    cmocka_unit_test_setup_teardown(test_bounce_buffers_run_out, setup_512, teardown),
	    cmocka_unit_test_setup_teardown(test_discard_write_zeroes, setup_512, teardown),
	    cmocka_unit_test_setup_teardown(test_4k_blocks, setup_4k, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
