#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes the seeds of the rpc fuzz target (tests/fuzz/rpc.c).

Each seed is: the size of the pieces less one, the stand-ins' state (bit 0 a
mirror exists, bit 1 it is active, bit 2 an incoming migration exists, bit 3
their operations fail), then what a client sends to vmig-blk's JSON-RPC
socket: every method of docs/vhost-user.md with good and bad params, ids of
every kind, requests cut anywhere, pipelines, and broken JSON.
"""
import json

import seeds as seeds_out


def req(method, params=None, rid=1):
    r = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        r["params"] = params
    return json.dumps(r, separators=(",", ":"))


def seed(text, chunk=256, state=0):
    return bytes([chunk - 1, state]) + text.encode()


methods = [
    ("vhost_get_controllers", None), ("bdev_get_iostat", None),
    ("vmig_blk_set_poll", {"poll_us": 100}), ("vmig_blk_set_poll", {"poll_us": -1}),
    ("vmig_blk_set_latency", {"read_us": 10, "write_us": 20}),
    ("vmig_blk_set_latency", {"read_us": "x"}),
    ("dirty_bitmap_start", {"granularity": 65536, "all_dirty": True}),
    ("dirty_bitmap_query", None), ("dirty_bitmap_take", {"max_bytes": 131072}),
    ("dirty_bitmap_stop", None), ("dirty_bitmap_start", {"granularity": 12288}),
    ("vmig_blk_mirror_start", {"uri": "unix:/nowhere", "granularity": 65536,
                               "speed": 1 << 20, "copy-mode": "write-blocking"}),
    ("vmig_blk_mirror_start", {"uri": 5}), ("vmig_blk_mirror_query", None),
    ("vmig_blk_mirror_change", {"copy-mode": "background"}),
    ("vmig_blk_mirror_set_speed", {"speed": 0}), ("vmig_blk_mirror_complete", None),
    ("vmig_blk_mirror_start_postcopy", None), ("vmig_blk_mirror_cancel", None),
    ("vmig_blk_incoming_query", None), ("vmig_blk_upgrade", None),
    ("vmig_blk_upgrade", {"binary": "/bin/sh"}), ("no_such_method", []),
]
every = "\n".join(req(m, p, i) for i, (m, p) in enumerate(methods))
seeds = {
    "every_method": seed(every),
    "every_method_mirror_active": seed(every, state=3),
    "every_method_failing": seed(every, chunk=7, state=15),
    "every_method_one_byte_pieces": seed(every, chunk=1, state=4),
    "ids": seed(req("dirty_bitmap_query", rid=-5) + req("dirty_bitmap_query", rid="a\\u00e9")
                + req("dirty_bitmap_query", rid=None) + req("dirty_bitmap_query", rid=1.5)
                + req("dirty_bitmap_query", rid=[1]) + '{"jsonrpc":"2.0","method":"x"}', chunk=3),
    "cut_literals": seed('{"id":true,"method":"dirty_bitmap_start","params":{"all_dirty":false}}'
                         ' {"id":-1e3,"method":"dirty_bitmap_query","params":[]}', chunk=2),
    "not_requests": seed('[] [1,2] {"method":1} {"id":{},"method":"x"} {"method":"x","params":5}'),
    "scalar": seed('{"method":"dirty_bitmap_query"} 42 {"method":"dirty_bitmap_query"}'),
    "stray_closer": seed('{"method":"dirty_bitmap_query"}}'),
    "cut_at_end": seed('{"method":"dirty_bitmap_query","id":1', chunk=5),
    "duplicate_key": seed('{"method":"dirty_bitmap_query","method":"x"}'),
    "deep": seed("[" * 1100 + "]" * 1100),
    "too_large": seed('{"method":"' + "x" * 66000 + '"}'),
}

seeds_out.write("rpc", seeds)
