#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes the seed corpus of the virtq_packed fuzz target (virtq_packed.c has
the input layout): packed rings of 8 descriptors with buffers made available
in the first lap, chained and indirect, with and without EVENT_IDX and dirty
logging, and in-flight regions as a back-end leaves them when it crashes:
buffers fetched and not returned, and a return stopped half-way, before and
after the used descriptor reached the ring. Layouts from lib/vhost/inflight.h
and virtio 1.1 section 2.7. Run it again after a layout change.
"""
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "corpus", "virtq_packed")

NUM = 8
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
FEATURES = (1 << 34) | (1 << 32)  # RING_PACKED, VERSION_1
EVENT_IDX = 1 << 29
DATA = 0x4000  # guest buffers from here
ALIGN = 64  # VHOST_INFLIGHT_ALIGN: each queue's part of the region is padded to it


def pdesc(addr, length, bid, flags):
    return struct.pack("<QIHH", addr, length, bid, flags)


def ram(ring, driver_event=b"", device_event=b"", extra=()):
    mem = bytearray(0x6000)
    mem[0:len(ring)] = ring
    mem[0x1000:0x1000 + len(driver_event)] = driver_event
    mem[0x2000:0x2000 + len(device_event)] = device_event
    for at, blob in extra:
        mem[at:at + len(blob)] = blob
    return bytes(mem)


def avail_flags(wrap, flags):
    return flags | (AVAIL if wrap else 0) | (0 if wrap else USED)


def ring_with(buffers, start=0, wrap=1):
    """buffers: lists of (length, flags) per descriptor; ids 0, 1, ..."""
    slots = [b"\0" * 16] * NUM
    pos = start
    for bid, descs in enumerate(buffers):
        for k, (length, flags) in enumerate(descs):
            more = F_NEXT if k + 1 < len(descs) else 0
            slots[pos] = pdesc(DATA + 0x200 * pos, length, bid, avail_flags(wrap, flags | more))
            pos += 1
            if pos == NUM:
                pos, wrap = 0, wrap ^ 1
    return b"".join(slots)


def header(flags, base):
    return struct.pack("<BBH", flags, 3, base)  # log2(8) = 3


def region(entries, used=0, old_used=0, wrap=1, old_wrap=1, free_head=0, old_free_head=0,
           version=1, features=FEATURES):
    hdr = struct.pack("<QHHHHHHBB10x", features, version, NUM, free_head, old_free_head,
                      used, old_used, wrap, old_wrap)
    descs = [b"\0" * 32] * NUM
    for i, e in entries.items():
        descs[i] = struct.pack("<BxHHHQHHIQ", e.get("inflight", 0), e.get("next", 0),
                               e.get("last", i), e.get("num", 0), e.get("counter", 0),
                               e.get("id", 0), e.get("flags", 0), e.get("len", 0),
                               e.get("addr", 0))
    body = hdr + b"".join(descs)
    return body + b"\0" * (-len(body) % ALIGN)  # vhost_inflight_packed_queue_size()


def seeds():
    req = [(16, 0), (512, F_WRITE), (1, F_WRITE)]  # a virtio-blk read: header, data, status
    three = ring_with([req, [(16, 0), (1, F_WRITE)], [(64, 0)]])
    yield "plain", header(0, 0x8000) + ram(three)
    yield "event_idx", header(1, 0x8000) + ram(three, struct.pack("<HH", 0x8003, 2))
    yield "logged", header(8, 0x8000) + ram(three)
    # an indirect table of two packed descriptors at 0x3000
    table = pdesc(DATA, 16, 0, 0) + pdesc(DATA + 0x100, 512, 0, F_WRITE)
    ind = pdesc(0x3000, 32, 0, avail_flags(1, F_INDIRECT)) + b"\0" * 16 * (NUM - 1)
    yield "indirect", header(2, 0x8000) + ram(ind, extra=[(0x3000, table)])
    # the ring wraps: buffers start at slot 6 in lap 1 and go on in lap 0
    yield "wrap", header(0, 0x8006) + ram(ring_with([req, req], start=6))
    # Crashed with buffers 0 (3 descriptors) and 1 (2) fetched, none returned.
    fetched = {0: {"inflight": 1, "next": 1, "last": 2, "num": 3, "counter": 1,
                   "flags": AVAIL | F_NEXT, "len": 16, "addr": DATA},
               1: {"next": 2, "flags": AVAIL | F_NEXT | F_WRITE, "len": 512,
                   "addr": DATA + 0x200},
               2: {"flags": AVAIL | F_WRITE, "len": 1, "addr": DATA + 0x400},
               3: {"inflight": 1, "next": 4, "last": 4, "num": 2, "counter": 2, "id": 1,
                   "flags": AVAIL | F_NEXT, "len": 16, "addr": DATA + 0x600},
               4: {"id": 1, "flags": AVAIL | F_WRITE, "len": 1, "addr": DATA + 0x800}}
    yield "inflight_two", header(4, 0x8000) + region(fetched) + ram(three)
    # Buffer 0's return stopped after step a: used_idx moved, the used
    # descriptor not written (the slot still holds what was fetched).
    yield "inflight_half_return", (header(4, 0x8000) +
                                   region(fetched, used=3, old_used=0, free_head=0) +
                                   ram(three))
    # ... and after step b: the used descriptor is in the ring (AVAIL == USED).
    done = bytearray(three)
    done[0:16] = pdesc(0, 0, 0, AVAIL | USED)
    yield "inflight_returned_unmarked", (header(4, 0x8000) +
                                         region(fetched, used=3, old_used=0, free_head=0) +
                                         ram(bytes(done)))
    # A region never initialised (version 0) and one of another ring size.
    yield "inflight_fresh", header(4, 0x8000) + region({}, version=0) + ram(three)
    bad = bytearray(region(fetched))
    bad[10:12] = struct.pack("<H", 16)
    yield "inflight_wrong_size", header(5, 0x8000) + bytes(bad) + ram(three)


def main():
    os.makedirs(out, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print("wrote %s" % out)


if __name__ == "__main__":
    main()
