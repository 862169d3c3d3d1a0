#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes the seed corpora of the stream and return-path fuzz targets.

The seeds are valid (or nearly valid) streams built from the byte layout in
docs/stream-format.md, for the two RAM blocks the fuzz target declares
(pc.ram: 16 pages, vga.vram: 4 pages). Run it again after a format change.
"""
import os
import struct
import sys
import zlib

PAGE = 4096
here = os.path.dirname(os.path.abspath(__file__))


def rec(rtype, payload=b""):
    return struct.pack("<BBHI", rtype, 0, 0, len(payload)) + payload


def preamble(version=2, channel=0, flags=0, session=0x1234):
    return b"VMIGSTRM" + struct.pack("<IHHQQ", version, channel, flags, session, ~session & (2**64 - 1))


def blocks(entries):
    body = struct.pack("<I", len(entries))
    for name, size in entries:
        body += struct.pack("<B3xIQ", len(name), PAGE, size) + name
    return rec(0x01, body)


def pages(block, first, data_pages):
    n = len(data_pages)
    return rec(0x02, struct.pack("<IIQ", block, n, first) + b"".join(data_pages))


def zero(block, first, n):
    return rec(0x03, struct.pack("<IIQ", block, n, first))


def sync(rnd, dirty):
    return rec(0x04, struct.pack("<QQ", rnd, dirty))


def state(blob):
    return rec(0x05, blob)


def digest(flags=0, page=0, mem=0):
    return rec(0x06, struct.pack("<IIQQ", flags, 0, page, mem))


def recv_bitmap(block, npages, bits):
    words = (npages + 63) // 64
    body = struct.pack("<IIQ", block, 0, npages) + struct.pack("<%dQ" % words, bits, *([0] * (words - 1)))
    return rec(0x45, body)


def eos():
    return rec(0x07)


def discard(block, first, n):
    return rec(0x08, struct.pack("<IIQQ", block, 0, first, n))


def postcopy_run():
    return rec(0x09)


def multifd(channels):
    return rec(0x0a, struct.pack("<II", channels, 0))


def zstd_rle_frame(byte, size):
    """A zstd frame holding one RLE block: size copies of byte (RFC 8878)."""
    fhd = 0xA0  # Frame_Content_Size_flag 2 (4 bytes), Single_Segment_flag
    block = (size << 3) | (1 << 1) | 1  # Block_Size, Block_Type RLE, Last_Block
    return (struct.pack("<IB", 0xFD2FB528, fhd) + struct.pack("<I", size) +
            struct.pack("<I", block)[:3] + bytes([byte]))


def pages_zlib(block, first, npages, stream):
    return rec(0x0c, struct.pack("<IIQ", block, npages, first) + stream)


def pages_zstd(block, first, npages, frame):
    return rec(0x0b, struct.pack("<IIQ", block, npages, first) + frame)


def page_of(byte):
    return bytes([byte]) * PAGE


def main():
    good_blocks = blocks([(b"pc.ram", 16 * PAGE), (b"vga.vram", 4 * PAGE)])
    full = (preamble() + good_blocks + pages(0, 0, [page_of(1), page_of(2)]) +
            zero(0, 2, 14) + zero(1, 0, 4) + sync(1, 3) + pages(0, 5, [page_of(9)]) +
            pages(1, 3, [page_of(7)]) + zero(0, 0, 1) + state(b"vcpu-state") +
            digest() + eos())
    seeds = {
        "stream": {
            "full": full,
            "full-verify": full.replace(digest(), digest(1, 5, 5)),
            "blocks-only": preamble() + good_blocks,
            "wrong-size": preamble() + blocks([(b"pc.ram", 8 * PAGE), (b"vga.vram", 4 * PAGE)]),
            "wrong-version": preamble(3) + good_blocks,
            "many-pages": preamble() + good_blocks +
                          pages(0, 0, [page_of(i) for i in range(16)]) + eos(),
            "oob-run": preamble() + good_blocks + zero(0, 15, 2),
            "unknown-record": preamble() + good_blocks + rec(0x7f, b"x"),
            # An odd session id makes the fuzz target install its hooks.
            "full-hooks": full.replace(preamble(), preamble(session=0x1235), 1),
            "postcopy": (preamble(session=0x1235) + good_blocks + pages(0, 0, [page_of(3)]) + zero(0, 1, 15) +
                         discard(0, 0, 2) + discard(1, 0, 4) + state(b"vcpu") +
                         postcopy_run() + pages(0, 0, [page_of(4), page_of(5)]) +
                         zero(1, 0, 4) + digest() + eos()),
            "postcopy-bad-discard": preamble(session=0x1235) + good_blocks + discard(0, 10, 7),
            "resume-preamble": preamble(flags=1) + good_blocks,
            "urgent-channel": preamble(channel=1) + pages(0, 3, [page_of(6)]),
            # Main channel of a multifd stream: no pages after MULTIFD.
            "multifd-main": (preamble() + good_blocks + multifd(2) + sync(1, 0) +
                             state(b"vcpu") + digest() + eos()),
            "multifd-main-page": preamble() + good_blocks + multifd(2) + pages(0, 0, [page_of(1)]),
            # A data channel (index in flags bits 8-15): pages, SYNC, EOS.
            "multifd-data": (preamble(channel=2) + pages(0, 0, [page_of(1), page_of(2)]) +
                             zero(0, 2, 14) + sync(1, 0) + pages(1, 1, [page_of(3)]) + eos()),
            "multifd-data-index1": preamble(channel=2, flags=1 << 8) + zero(0, 0, 4) + eos(),
            "multifd-data-zlib": (preamble(channel=2) +
                                  pages_zlib(0, 0, 1, zlib.compress(b"\x42" * PAGE)) +
                                  pages_zlib(0, 1, 2, zlib.compress(b"\x17" * PAGE)) +
                                  pages_zlib(0, 3, 1, zlib.compress(b"\x17" * PAGE) + b"x") +
                                  eos()),
            "multifd-data-zstd": (preamble(channel=2) + pages_zstd(0, 0, 1, zstd_rle_frame(0x42, PAGE)) +
                                  pages_zstd(0, 1, 2, zstd_rle_frame(0x17, 2 * PAGE)) +
                                  pages_zstd(0, 3, 2, zstd_rle_frame(0x17, PAGE)) + eos()),
        },
        # The first byte selects the mode: even, messages only; odd, the
        # RECV_BITMAP exchange of a post-copy resume first.
        "return_path": {
            "resumed": b"\0" + rec(0x41, struct.pack("<Q", 1234)),
            "error": b"\0" + rec(0x42, b"RAM block 'pc.ram' size mismatch"),
            "error-binary": b"\0" + rec(0x42, bytes(range(0, 256, 7))),
            "ready-then-resumed": b"\0" + rec(0x40) + rec(0x41, struct.pack("<Q", 5)),
            "oversized": b"\0" + struct.pack("<BBHI", 0x42, 0, 0, 1 << 20),
            "page-request": b"\0" + rec(0x44, struct.pack("<IIQ", 0, 1, 7)),
            "page-requests": b"\0" + b"".join(rec(0x44, struct.pack("<IIQ", b, n, f))
                                               for b, n, f in ((0, 4, 0), (1, 4, 0), (0, 16, 0),
                                                               (0, 2, 15), (2, 1, 0), (0, 0, 3))),
            "sync-acks": b"\0" + rec(0x43, struct.pack("<Q", 3)) + rec(0x43, struct.pack("<Q", 2)),
            "wrong-size": b"\0" + rec(0x41, b"\1\2\3"),
            "complete": b"\0" + rec(0x41, struct.pack("<Q", 1)) + rec(0x43, struct.pack("<Q", 3)) +
                        rec(0x46),
            "resume-bitmaps": b"\1" + recv_bitmap(0, 16, 0x00ff) + recv_bitmap(1, 4, 0x5) +
                              rec(0x44, struct.pack("<IIQ", 0, 1, 9)) + rec(0x46),
            "resume-bad-bitmap": b"\1" + recv_bitmap(1, 16, 0) + recv_bitmap(0, 4, 0),
        },
    }
    for target, files in seeds.items():
        d = os.path.join(here, "corpus", target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
