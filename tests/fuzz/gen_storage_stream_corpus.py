#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes the seeds of the storage_stream fuzz target (tests/fuzz/storage_stream.c).

Source-to-destination streams (preamble and records, docs/storage-migration.md)
on small disks, good and bad, and return paths (no preamble) for a 1 MiB
disk. Run it again after a format change.
"""
import struct

import seeds as seeds_out


DATA, ZERO, SYNC, FLUSH, EOS, MISSING, POSTCOPY = 1, 2, 3, 4, 5, 6, 7
ACK, ERROR, READ_REQ, DONE, MISSING_MAP, MAP_END = 0x41, 0x42, 0x43, 0x44, 0x45, 0x46
F_POSTCOPY = 2
SESSION = bytes(range(1, 17))


def preamble(size=1 << 20, block=512, gran=65536, version=1, flags=0):
    return b"VMIGBLKS" + struct.pack("<IHHQII", version, flags, 0, size, block, gran) + SESSION


def rec(rtype, payload=b"", flags=0):
    return struct.pack("<BBHI", rtype, flags, 0, len(payload)) + payload


def data(off, content):
    return rec(DATA, struct.pack("<Q", off) + content)


def rng(rtype, a, b, flags=0):
    return rec(rtype, struct.pack("<QQ", a, b), flags)


seeds = {
    "empty_stream": preamble() + rec(EOS),
    "one_round": preamble() + data(0, b"\xaa" * 512) + data(65536, b"\x55" * 4096)
    + rng(ZERO, 4096, 8192) + rng(SYNC, 1, 65536) + rec(FLUSH) + rec(EOS),
    "two_rounds_unmap": preamble(size=2 << 20, block=4096)
    + data(0, bytes(range(256)) * 16) + rng(SYNC, 1, 4096)
    + rng(ZERO, 1 << 20, 1 << 20, flags=1) + data((2 << 20) - 4096, b"\x01" * 4096)
    + rng(SYNC, 2, 0) + rec(FLUSH) + rec(EOS),
    "last_block": preamble(size=8192) + data(7680, b"\x7f" * 512) + rec(EOS),
    "data_past_end": preamble(size=8192) + data(7680, b"\x7f" * 1024) + rec(EOS),
    "data_wraps": preamble() + data((1 << 64) - 512, b"\x00" * 1024),
    "zero_wraps": preamble() + rng(ZERO, 512, (1 << 64) - 512),
    "round_repeats": preamble() + rng(SYNC, 3, 0) + rng(SYNC, 3, 0),
    "after_eos": preamble() + rec(EOS) + rec(FLUSH),
    "bad_version": preamble(version=2) + rec(EOS),
    "unaligned": preamble(block=4096) + data(512, b"\x00" * 4096),
    "big_disk": preamble(size=1 << 40, gran=1 << 20) + data((1 << 40) - 4096, b"\x33" * 4096)
    + rng(ZERO, 0, 1 << 40) + rec(EOS),
    "return_path": rec(ACK, struct.pack("<Q", 1))
    + rng(READ_REQ, 65536, 4096) + rec(ACK, struct.pack("<Q", 2)) + rec(DONE),
    "return_error": rec(ACK, struct.pack("<Q", 1)) + rec(ERROR, b"disk full on the destination"),
    "return_bad_req": rng(READ_REQ, (1 << 20) - 512, 1024),
    # post-copy storage: a 1 MiB disk in 16 granules of 64 KiB
    "postcopy_switch": preamble() + data(0, b"\x11" * 512) + rng(SYNC, 1, 0)
    + rec(MISSING, struct.pack("<QQ", 0, 0x8005)) + rec(POSTCOPY)
    + data(0, b"\x22" * 65536) + rng(ZERO, 2 * 65536, 65536, flags=1)
    + data(15 * 65536, b"\x33" * 65536) + rec(FLUSH) + rec(EOS),
    "postcopy_resumed": preamble(flags=F_POSTCOPY) + data(65536, b"\x44" * 65536) + rec(EOS),
    "postcopy_last_partial": preamble(size=(1 << 20) + 4096)
    + rec(MISSING, struct.pack("<QQ", 0, 0x10000)) + rec(POSTCOPY)
    + data(1 << 20, b"\x55" * 4096) + rec(EOS),
    "postcopy_unaligned": preamble() + rec(POSTCOPY) + data(512, b"\x66" * 512),
    "postcopy_map_past_end": preamble() + rec(MISSING, struct.pack("<QQ", 0, 1 << 16)),
    "return_resumed": b"R" + rec(MISSING_MAP, struct.pack("<QQ", 0, 0xffff)) + rec(MAP_END)
    + rng(READ_REQ, 65536, 65536) + rec(DONE),
    "return_map_unasked": rec(MISSING_MAP, struct.pack("<QQ", 0, 1)),
}

seeds_out.write("storage_stream", seeds)
