// SPDX-License-Identifier: MIT
/*
 * Buffered reader for the migration stream. Small reads (record headers) are
 * served from an 8 KiB buffer; reads of a page or more (page payloads) go
 * straight from the channel into their destination, so received pages are
 * copied once. The buffer is small on purpose: a refill for a header also
 * takes whatever follows it, up to the buffer's size, and page data taken
 * that way is copied twice (with 64 KiB, a quarter of every 256 KiB run).
 * The same reader can read from memory, which is how the fuzzer feeds it.
 */
#include <errno.h>
#include <string.h>

#include "stream/stream.h"

void vmig__reader_init_chan(struct vmig__reader *r, struct vmig__chan *c)
{
	r->c = c;
	r->mem = NULL;
	r->mem_len = r->mem_pos = 0;
	r->bytes = 0;
	r->pos = r->len = 0;
}

void vmig__reader_init_mem(struct vmig__reader *r, const void *data, size_t len)
{
	vmig__reader_init_chan(r, NULL);
	r->mem = data;
	r->mem_len = len;
}

/* One read from the source: returns bytes (> 0), -EPIPE at end, or -errno. */
static ssize_t source_read(struct vmig__reader *r, void *dst, size_t n)
{
	ssize_t got;

	if (!r->c) {
		size_t left = r->mem_len - r->mem_pos;

		if (!left)
			return -EPIPE;
		got = (ssize_t)(n < left ? n : left);
		memcpy(dst, r->mem + r->mem_pos, (size_t)got);
		r->mem_pos += (size_t)got;
		return got;
	}
	return vmig__chan_read(r->c, dst, n);
}

int vmig__reader_read(struct vmig__reader *r, void *dst, size_t n)
{
	uint8_t *out = dst;

	while (n) {
		ssize_t got;

		if (r->pos < r->len) {
			size_t take = r->len - r->pos < n ? r->len - r->pos : n;

			memcpy(out, r->buf + r->pos, take);
			r->pos += take;
			out += take;
			n -= take;
			continue;
		}
		if (n >= VMIG_READER_BUF / 2) {
			got = source_read(r, out, n);
			if (got < 0)
				return (int)got;
			r->bytes += (uint64_t)got;
			out += got;
			n -= (size_t)got;
			continue;
		}
		got = source_read(r, r->buf, VMIG_READER_BUF);
		if (got < 0)
			return (int)got;
		r->bytes += (uint64_t)got;
		r->pos = 0;
		r->len = (size_t)got;
	}
	return 0;
}

int vmig__reader_read_exact(struct vmig__reader *r, void *dst, size_t n)
{
	uint8_t *out = dst;
	size_t take = r->len - r->pos < n ? r->len - r->pos : n;

	memcpy(out, r->buf + r->pos, take);
	r->pos += take;
	for (size_t done = take; done < n;) {
		ssize_t got = source_read(r, out + done, n - done);

		if (got < 0)
			return (int)got;
		r->bytes += (uint64_t)got;
		done += (size_t)got;
	}
	return 0;
}

int vmig__reader_skip(struct vmig__reader *r, size_t n)
{
	uint8_t scratch[4096];

	while (n) {
		size_t take = n < sizeof(scratch) ? n : sizeof(scratch);
		int ret = vmig__reader_read(r, scratch, take);

		if (ret)
			return ret;
		n -= take;
	}
	return 0;
}

const char *vmig__reader_strerror(const struct vmig__reader *r, int ret)
{
	return vmig__chan_strerror(r->c, ret);
}
