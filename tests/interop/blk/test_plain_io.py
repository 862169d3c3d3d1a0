#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Plain I/O through the backend: a Linux guest under QEMU writes and verifies
patterned O_DIRECT blocks for 15 s, and uses flush, discard and write-zeroes
(the zeroed ranges must read back as zero). The disk's serial (GET_ID) must
show in /sys/block/vda/serial, and afterwards the image on the host must hold
only zero blocks or valid, well-placed pattern blocks.

Usage: test_plain_io.py BUILD_DIR   (VBLK_BACKEND=qsd to run against
qemu-storage-daemon instead of vmig-blk)
"""
import os

import blkenv

GUEST_SECONDS = 15


def body(env):
    image = env.image()
    sock = os.path.join(env.tmp, "blk.sock")
    be = env.backend("backend", sock, image, serial="vmig-plain-0042").start()
    guest = blkenv.Guest(env, "qemu", sock,
                         ["--seconds", GUEST_SECONDS, "--features", "--blocks", 8192,
                          "--serial", be.serial]).start()
    result = guest.result(timeout_s=GUEST_SECONDS + 90)
    s = env.check_summary(guest, result, min_writes=500)
    dev = blkenv.parse_kv_lines(guest.serial(), "DEVICE")
    dev = dev[0] if dev else {}
    env.case("serial_visible", dev.get("serial") == be.serial and s.get("serial_ok") == "1",
             "guest /sys/block/vda/serial=%r, want %r" % (dev.get("serial"), be.serial))
    env.case("discard_supported", dev.get("discard_max_bytes", "0") not in ("0", "?"),
             "discard_max_bytes=%s" % dev.get("discard_max_bytes"))
    env.case("write_zeroes_supported",
             dev.get("write_zeroes_max_bytes", "0") not in ("0", "?"),
             "write_zeroes_max_bytes=%s" % dev.get("write_zeroes_max_bytes"))
    env.case("flush_discard_zeroes_done",
             int(s.get("flushes", 0)) >= 2 and int(s.get("discards", 0)) >= 1 and
             int(s.get("zeroouts", 0)) >= 1,
             "flushes=%s discards=%s zeroouts=%s" % (s.get("flushes"), s.get("discards"),
                                                    s.get("zeroouts")))
    env.info("guest write_cache=%s writes=%s reads=%s maxgap_ms=%s" %
             (dev.get("write_cache"), s.get("writes"), s.get("reads"), s.get("maxgap_ms")))
    guest.proc.stop()
    be.proc.stop()
    rc, scan, out = env.scan_image(image)
    env.case("image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])


blkenv.run("plain_io", body)
