#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes the named seeds of the blk_req fuzz target (tests/fuzz/blk_req.c).

Each seed is a disk (flags, size) and a few virtio-blk requests in the
target's input format (see the comment at the top of blk_req.c): reads,
writes, flushes, get-id, discard and write-zeroes, valid and not, at the
edges of the disk, through indirect tables, split across guest memory
regions and outside guest memory. Run it again after a format change.
"""
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ = 0, 1, 4, 8, 11, 13
F_NULL, F_RO, F_ZEROES, F_4K, F_EVENT_IDX, F_LOG, F_DIRTY, F_DIRTY_64K = 1, 2, 4, 8, 16, 32, 64, 128
UNMAP = 1


def disk(flags=0, size_4k=16):
    return bytes([flags, size_4k - 1])


def hdr(rtype, sector=0):
    return struct.pack("<IIQ", rtype, 0, sector)


def rd(length, content=b"", addr=None):
    """A device-readable buffer; its first bytes are content (255 at most)."""
    flags = 0 if addr is None else 2
    out = struct.pack("<BH", flags, length)
    if addr is not None:
        out += struct.pack("<I", addr)
    return out + bytes([len(content)]) + content


def wr(length, addr=None):
    """A device-writable buffer."""
    flags = 1 if addr is None else 3
    out = struct.pack("<BH", flags, length)
    if addr is not None:
        out += struct.pack("<I", addr)
    return out


def req(*descs, indirect=False):
    return bytes([1 if indirect else 0, len(descs)]) + b"".join(descs)


def seg(sector, num, flags=0):
    return struct.pack("<QII", sector, num, flags)


def simple(rtype, sector=0, data_len=0, out_data=b""):
    """Header, data (readable for writes, writable for reads), status."""
    if rtype in (T_IN, T_GET_ID):
        return req(rd(16, hdr(rtype, sector)), wr(data_len), wr(1))
    if len(out_data) > 255:  # a buffer's content is 255 bytes at most: two buffers
        return req(rd(16, hdr(rtype, sector)), rd(255, out_data[:255]),
                   rd(len(out_data) - 255, out_data[255:]), wr(1))
    if out_data or data_len:
        return req(rd(16, hdr(rtype, sector)), rd(max(data_len, len(out_data)), out_data), wr(1))
    return req(rd(16, hdr(rtype, sector)), wr(1))


SEEDS = {
    # the usual requests on a 64 KiB RAM disk
    "read": disk() + simple(T_IN, 8, 4096),
    "write-read": disk() + simple(T_OUT, 16, 1024, b"hello, disk") + simple(T_IN, 16, 1024),
    "flush": disk() + simple(T_FLUSH),
    "get-id": disk() + simple(T_GET_ID, 0, 20),
    "get-id-short": disk() + simple(T_GET_ID, 0, 7),
    "get-id-one-buffer": disk() + req(rd(16, hdr(T_GET_ID)), wr(21)),
    "discard": disk() + simple(T_DISCARD, 0, 0, seg(0, 8) + seg(64, 16)),
    "write-zeroes-unmap": disk() + simple(T_WZ, 0, 0, seg(32, 8, UNMAP) + seg(0, 1)),
    "write-zeroes-bad-flags": disk() + simple(T_WZ, 0, 0, seg(0, 8, 2)),
    "discard-unmap-flag": disk() + simple(T_DISCARD, 0, 0, seg(0, 8, UNMAP)),
    "discard-17-segments": disk() + simple(T_DISCARD, 0, 0, seg(0, 1) * 17),
    "discard-half-segment": disk() + simple(T_DISCARD, 0, 0, seg(0, 1) + b"\0" * 8),
    "discard-past-end": disk() + simple(T_DISCARD, 0, 0, seg(120, 16)),
    "discard-huge": disk() + simple(T_DISCARD, 0, 0, seg(0, (1 << 22) + 1)),
    "discard-wrap": disk() + simple(T_DISCARD, 0, 0, seg(2 ** 64 - 8, 16)),
    # the edges of the disk (128 sectors)
    "read-last-sector": disk() + simple(T_IN, 127, 512),
    "read-past-end": disk() + simple(T_IN, 127, 1024),
    "read-sector-wrap": disk() + simple(T_IN, 2 ** 64 - 1, 1024),
    "write-at-end": disk() + simple(T_OUT, 128, 0) + simple(T_OUT, 129, 0),
    "read-partial-sector": disk() + simple(T_IN, 0, 100),
    "unknown-types": disk() + simple(2) + simple(14) + simple(0x80000001) + simple(T_OUT | 0x80000000),
    # 4 KiB logical blocks: misaligned sectors and lengths
    "4k-aligned": disk(F_4K) + simple(T_IN, 8, 4096) + simple(T_OUT, 16, 8192, b"x" * 200),
    "4k-misaligned": disk(F_4K) + simple(T_IN, 1, 4096) + simple(T_IN, 8, 512)
    + simple(T_DISCARD, 0, 0, seg(4, 8)),
    # other disks
    "read-only": disk(F_RO) + simple(T_OUT, 0, 512, b"no") + simple(T_DISCARD, 0, 0, seg(0, 8))
    + simple(T_IN, 0, 512) + simple(T_FLUSH),
    "null": disk(F_NULL) + simple(T_OUT, 0, 512, b"gone") + simple(T_IN, 0, 512)
    + simple(T_WZ, 0, 0, seg(0, 8)),
    "null-zeroes": disk(F_NULL | F_ZEROES) + simple(T_IN, 0, 4096),
    "event-idx-log": disk(F_EVENT_IDX | F_LOG) + simple(T_OUT, 0, 4096, b"logged")
    + simple(T_IN, 0, 8192) + simple(T_GET_ID, 0, 20),
    # dirty-block tracking: what each request marks
    "dirty-4k": disk(F_DIRTY, 64) + simple(T_OUT, 9, 1024, b"dirty") + simple(T_IN, 0, 4096)
    + simple(T_DISCARD, 0, 0, seg(64, 8) + seg(200, 1)) + simple(T_WZ, 0, 0, seg(300, 16, UNMAP))
    + simple(T_OUT, 511, 1024) + simple(T_OUT, 100, 0),
    "dirty-64k": disk(F_DIRTY | F_DIRTY_64K | F_4K, 40) + simple(T_OUT, 120, 8192, b"x")
    + simple(T_WZ, 0, 0, seg(256, 8)) + simple(T_DISCARD, 0, 0, seg(3, 8)),
    "dirty-null": disk(F_DIRTY | F_NULL) + simple(T_OUT, 0, 512) + simple(T_WZ, 0, 0, seg(8, 8)),
    "dirty-read-only": disk(F_DIRTY | F_RO) + simple(T_OUT, 0, 512) + simple(T_DISCARD, 0, 0, seg(8, 8)),
    # chain layouts
    "header-split": disk() + req(rd(8, hdr(T_IN, 4)[:8]), rd(8, hdr(T_IN, 4)[8:]), wr(512), wr(1)),
    "header-with-data": disk() + req(rd(16 + 512, hdr(T_OUT, 2) + b"inline"), wr(1)),
    "data-and-status": disk() + req(rd(16, hdr(T_IN, 2)), wr(513)),
    "status-zero-length-last": disk() + req(rd(16, hdr(T_IN, 2)), wr(512), wr(1), wr(0)),
    "no-status": disk() + req(rd(16, hdr(T_OUT, 0)), rd(512)),
    "no-header": disk() + req(wr(1)) + req(rd(15, hdr(T_IN)[:15]), wr(1)),
    "readable-after-writable": disk() + req(rd(16, hdr(T_IN)), wr(512), rd(16), wr(1)),
    "indirect-many": disk(F_LOG) + req(rd(16, hdr(T_IN, 0)), *[wr(512)] * 100, wr(1), indirect=True),
    "indirect-write": disk() + req(rd(16, hdr(T_OUT, 8)), *[rd(512, b"%d" % i) for i in range(20)],
                                   wr(1), indirect=True),
    "cross-region": disk(F_LOG) + req(rd(16, hdr(T_IN, 0)), wr(1024, addr=0xfe00), wr(1)),
    "outside-memory": disk() + req(rd(16, hdr(T_IN, 0)), wr(512, addr=0x1ff00), wr(1))
    + req(rd(16, hdr(T_OUT, 0), addr=0x40000000), wr(1)),
    "too-many-iovecs": disk() + req(rd(16, hdr(T_IN, 0)), *[wr(0x200, addr=0xff00)] * 200,
                                    wr(1), indirect=True),
    "status-in-used-ring": disk() + req(rd(16, hdr(T_IN, 0)), wr(512), wr(1, addr=0x2010)),
    "write-into-ring": disk() + req(rd(16, hdr(T_IN, 0)), wr(512, addr=0x1000), wr(1)),
}


def main():
    out = os.path.join(here, "corpus", "blk_req")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
