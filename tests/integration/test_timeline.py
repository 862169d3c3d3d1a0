#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""`vmig migrate --timeline` and `vmig timeline` against real vmig-vm processes.

Each migration case runs the CLI between two vmig-vm processes over loopback,
then checks the SVG it drew: well-formed XML, one path per series with data
points in it, the marks (dirty syncs, downtime, post-copy switch) where the
run had them, and that headless Chromium loads it without an XML error and
paints it (a screenshot that is not blank and shows the series' colours).
The log is drawn again with `vmig timeline` and must give the same picture.
Runs that end badly (Ctrl-C, a dead destination) are drawn too.
Bad logs (truncated, garbage, empty, hostile values) must give a clear error
or a well-formed picture, never a crash.

Chromium is required: without it the cases fail, they are not skipped
(scripts/install-deps.sh installs it).

usage: test_timeline.py BUILD_DIR
"""
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, Runner, check, free_port, push_after_requests  # noqa: E402

SVG_NS = "{http://www.w3.org/2000/svg}"
SERIES = ("throughput", "dirty-rate", "remaining", "expected-downtime", "postcopy-requests")
# The colours timeline_svg.c gives these series: the screenshot must show them.
COLOURS = {"throughput": (0x1f, 0x77, 0xb4), "remaining": (0x2c, 0xa0, 0x2c),
           "expected-downtime": (0x94, 0x67, 0xbd)}


def cli(build):
    return os.path.join(build, "tools", "vmig", "vmig")


def chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("chromium is not installed (scripts/install-deps.sh installs it)")


def pair(procs, build, dst_args=("-S",)):
    src = VM(procs, build, "--mem", "128M", "--vcpus", 2, "--workload", "random",
             "--dirty-rate", "32M", "--fill", "random", name="src")
    dst = VM(procs, build, "--mem", "128M", "--vcpus", 2, "--incoming", "defer",
             *dst_args, name="dst")
    return src, dst


def migrate(build, src, dst, svg, *extra, during=None):
    """Runs vmig migrate --timeline; returns the completed process.
    during(proc), if given, runs while the command does."""
    # vmig-vm serves several QMP clients: the harness keeps its own.
    argv = [cli(build), "migrate", "unix:" + src.qmp_path, "tcp:127.0.0.1:%d" % free_port(),
            "--dest", "unix:" + dst.qmp_path, "--no-progress", "--timeline", svg] + list(extra)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        try:
            if during:
                during(p)
            p.wait(timeout=180)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        out.seek(0)
        err.seek(0)
        r = subprocess.CompletedProcess(argv, p.returncode, out.read(), err.read())
    check(r.returncode == 0, "vmig migrate exited %d: %s" % (r.returncode, r.stderr[-800:]))
    check("timeline drawn in" in r.stderr, "no word of the timeline: %s" % r.stderr[-500:])
    return r


def parse_svg(path):
    """The SVG's root, after checking it is well-formed XML and an <svg>."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AssertionError("%s is not well-formed XML: %s" % (path, e))
    check(root.tag == SVG_NS + "svg", "root element is %s" % root.tag)
    return root


def by_id(root):
    return {e.get("id"): e for e in root.iter() if e.get("id")}


def path_points(el):
    """The (x, y) points of a series path's d attribute."""
    d = el.get("d", "")
    pts = []
    for cmd in d.replace("M", "|M").replace("L", "|L").split("|"):
        cmd = cmd.strip()
        if cmd:
            x, y = cmd[1:].split()
            pts.append((float(x), float(y)))
    return pts


def check_series(root, min_points):
    """Every series has its path; those in min_points have at least that
    many points, and its data-points attribute agrees with its d."""
    ids = by_id(root)
    for s in SERIES:
        el = ids.get("series-" + s)
        check(el is not None and el.tag == SVG_NS + "path", "no path for series %s" % s)
        pts = path_points(el)
        check(int(el.get("data-points")) == len(pts),
              "%s: data-points %s but %d points" % (s, el.get("data-points"), len(pts)))
        check(len(pts) >= min_points.get(s, 0),
              "%s has %d points, expected %d" % (s, len(pts), min_points.get(s, 0)))
    return ids


def statuses(root):
    return [e.get("data-status") for e in root.iter(SVG_NS + "rect")
            if e.get("class") == "status-span"]


def syncs(root):
    return [int(e.get("data-count")) for e in root.iter(SVG_NS + "line")
            if e.get("class") == "mark sync"]


# ---- rendering in headless Chromium ----

def png_pixels(path):
    """(width, height, rows of (r, g, b)) of an 8-bit RGB or RGBA PNG."""
    with open(path, "rb") as f:
        data = f.read()
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "%s is not a PNG" % path)
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, ctype = hdr[0], hdr[1], hdr[2], hdr[3]
    check(depth == 8 and ctype in (2, 6), "PNG of depth %d, colour type %d" % (depth, ctype))
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append([tuple(line[i:i + 3]) for i in range(0, stride, bpp)])
        prev = line
    return w, h, rows


def render(svg, workdir, colours=COLOURS):
    """Loads svg in headless Chromium: its DOM must be the SVG, with no
    parser error; its screenshot must not be blank and must show colours."""
    exe = chromium()
    url = "file://" + os.path.abspath(svg)
    common = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
              "--user-data-dir=" + os.path.join(workdir, "chromium-profile")]
    r = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "chromium --dump-dom exited %d: %s" % (r.returncode, r.stderr[-500:]))
    check("<svg" in r.stdout, "chromium's DOM holds no <svg>: %s" % r.stdout[:300])
    check("parsererror" not in r.stdout and "following errors" not in r.stdout,
          "chromium reports an XML error: %s" % r.stdout[:800])
    png = os.path.join(workdir, os.path.basename(svg) + ".png")
    r = subprocess.run(common + ["--window-size=1000,900", "--screenshot=" + png, url],
                       capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "chromium --screenshot exited %d: %s" % (r.returncode, r.stderr[-500:]))
    check(os.path.exists(png) and os.path.getsize(png) > 0, "no screenshot written")
    w, h, rows = png_pixels(png)
    pixels = [p for row in rows for p in row]
    white = sum(1 for p in pixels if p == (255, 255, 255))
    check(white < 0.99 * len(pixels), "the screenshot is blank (%d of %d white)" % (white, len(pixels)))
    for name, want in colours.items():
        close = sum(1 for p in pixels if all(abs(p[i] - want[i]) <= 24 for i in range(3)))
        check(close >= 20, "no %s line to see in the screenshot (%d pixels)" % (name, close))


# ---- cases ----

def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def case_precopy(procs, build):
    """A throttled pre-copy of a guest that writes: several rounds."""
    src, dst = pair(procs, build)
    d = procs.tmpdir()
    svg = os.path.join(d, "run.svg")
    migrate(build, src, dst, svg, "--max-bandwidth", "48M")
    root = parse_svg(svg)
    ids = check_series(root, {"throughput": 10, "dirty-rate": 10, "remaining": 10,
                              "expected-downtime": 10, "postcopy-requests": 10})
    check("mark-downtime" in ids and "final-downtime" in ids, "downtime not marked")
    check("mark-postcopy" not in ids, "a post-copy switch marked in a pre-copy")
    st = statuses(root)
    check("active" in st and st[-1] == "completed", "status spans %r" % st)
    s = syncs(root)
    check(len(s) >= 2 and s == sorted(s), "dirty syncs %r" % s)
    check("limit-rate" in ids, "max-bandwidth not drawn")
    log = read_log(svg + ".log")
    check(log[0].get("vmig-timeline") == 1, "log header %r" % log[0])
    samples = [x for x in log if "query-migrate" in x]
    check(len(samples) >= 10 and samples[-1]["query-migrate"]["status"] == "completed",
          "%d samples in the log" % len(samples))
    check(any("event" in x for x in log), "no QMP event in the log")
    # As in QEMU, "active" starts after the first dirty sync, with the
    # whole RAM to send: the first round is itself a sync's mark, so even
    # a guest too slow to need a second round shows two marks.
    first = next(x["query-migrate"] for x in samples if x["query-migrate"]["status"] == "active")
    check(first["ram"]["dirty-sync-count"] >= 1 and first["ram"]["remaining"] > 0,
          "the first active sample: %r" % first["ram"])
    # One point per running sample that had the field: none invented, none lost.
    running = [x["query-migrate"] for x in samples
               if x["query-migrate"]["status"] not in ("completed", "failed", "cancelled")]
    for series, field in (("throughput", "mbps"), ("remaining", "remaining")):
        want = sum(1 for q in running if field in q.get("ram", {}))
        if series == "remaining":
            want += 1  # the completed sample's remaining, 0
        got = int(ids["series-" + series].get("data-points"))
        check(got == want, "%s: %d points for %d samples" % (series, got, want))
    render(svg, d)
    # Drawn again from the log: the same picture.
    again = os.path.join(d, "again.svg")
    r = subprocess.run([cli(build), "timeline", svg + ".log", "-o", again],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 0, "vmig timeline exited %d: %s" % (r.returncode, r.stderr))
    with open(svg) as a, open(again) as b:
        check(a.read() == b.read(), "the redrawn picture differs from the live one")


def case_postcopy(procs, build):
    """Post-copy after 1 s, into a destination that runs and so asks for
    pages: the switch and the requests show."""
    src, dst = pair(procs, build, ("--workload", "random", "--dirty-rate", "32M"))
    d = procs.tmpdir()
    svg = os.path.join(d, "pc.svg")
    log = os.path.join(d, "pc.jsonl")
    # Unlimited, the push may place all of RAM before the destination's
    # vCPUs first fault: held back until both sides counted a request.
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 8 << 20})

    migrate(build, src, dst, svg, "--max-bandwidth", "32M", "--capability", "postcopy-ram=on",
            "--postcopy-after", "1", "--timeline-log", log,
            during=lambda p: push_after_requests(src, dst, running=lambda: p.poll() is None))
    check(not os.path.exists(svg + ".log"), "--timeline-log ignored")
    root = parse_svg(svg)
    ids = check_series(root, {"throughput": 5, "remaining": 5, "postcopy-requests": 5})
    check("mark-postcopy" in ids, "post-copy switch not marked")
    check("postcopy-active" in statuses(root), "status spans %r" % statuses(root))
    x_switch = float(ids["mark-postcopy"].get("x1"))
    requests = path_points(ids["series-postcopy-requests"])
    zero_y = max(y for _, y in requests)  # SVG's y grows downwards
    check(any(y < zero_y for _, y in requests), "no page request drawn: %r" % requests[-3:])
    check(all(x >= x_switch - 1 for x, y in requests if y < zero_y),
          "page requests drawn before the switch to post-copy")
    samples = [x["query-migrate"] for x in read_log(log) if "query-migrate" in x]
    check(max(s.get("ram", {}).get("postcopy-requests", 0) for s in samples) > 0,
          "the source counted no page request")
    render(svg, d, {"throughput": COLOURS["throughput"], "remaining": COLOURS["remaining"]})


def case_cancel_and_failure(procs, build):
    """A run that ends badly is drawn too: cancelled by Ctrl-C, or failed
    because the destination died (its error in the subtitle). A timeline
    that cannot be written stops the command before any migration."""
    src, dst = pair(procs, build)
    d = procs.tmpdir()
    svg = os.path.join(d, "cancel.svg")
    argv = [cli(build), "migrate", "unix:" + src.qmp_path, "tcp:127.0.0.1:%d" % free_port(),
            "--dest", "unix:" + dst.qmp_path, "--no-progress", "--max-bandwidth", "8M",
            "--timeline", svg]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    check(p.returncode == 1, "exit %d after Ctrl-C: %s" % (p.returncode, err[-500:]))
    root = parse_svg(svg)
    check_series(root, {"throughput": 5})
    check(statuses(root)[-1] == "cancelled", "status spans %r" % statuses(root))

    src2, dst2 = pair(procs, build)
    svg = os.path.join(d, "failed.svg")
    argv[2], argv[5] = "unix:" + src2.qmp_path, "unix:" + dst2.qmp_path
    argv[-1] = svg
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        dst2.kill()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    check(p.returncode == 1, "exit %d with the destination dead: %s" % (p.returncode, err[-500:]))
    root = parse_svg(svg)
    check(statuses(root)[-1] == "failed", "status spans %r" % statuses(root))
    texts = " ".join(t.text or "" for t in root.iter(SVG_NS + "text"))
    check("error: " in texts, "the failure's error-desc is not shown: %r" % texts[:400])
    render(svg, d, {"throughput": COLOURS["throughput"]})

    r = subprocess.run([cli(build), "migrate", "unix:" + src.qmp_path, "tcp:127.0.0.1:1",
                        "--timeline", os.path.join(d, "no", "such", "dir.svg")],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 1 and "cannot create the timeline log" in r.stderr,
          "unwritable timeline: exit %d: %s" % (r.returncode, r.stderr))
    check(src.migrate_status().get("status") == "cancelled", "a migration was started anyway")


def write(path, text):
    with open(path, "w" if isinstance(text, str) else "wb") as f:
        f.write(text)
    return path


def redraw(build, log, out):
    return subprocess.run([cli(build), "timeline", log, "-o", out], capture_output=True,
                          text=True, timeout=60)


HEADER = '{"vmig-timeline": 1, "started": "2026-12-05T10:00:00Z", "uri": "tcp:h:1"}\n'
SAMPLE = ('{"t": %s, "query-migrate": {"status": "active", "expected-downtime": 5, "ram": '
          '{"mbps": 800.5, "remaining": %d, "dirty-pages-rate": 100, "page-size": 4096, '
          '"dirty-sync-count": %d, "postcopy-requests": 0}}}\n')


def case_bad_logs(procs, build):
    """Every bad log gets a clear error (exit 1, PATH:LINE: why), no picture
    and no crash."""
    d = procs.tmpdir()
    good = HEADER + "".join(SAMPLE % (i / 10, 1000000 - i * 1000, i // 5) for i in range(40))
    cut = good[:len(good) - 37]  # the last line cut short, as by a crash
    cases = {
        "truncated": (cut, ":41: not valid JSON (the log looks truncated)"),
        "garbage": (random.Random(7).randbytes(4096), ":1: "),
        "text": ("hello world\n", ":1: not valid JSON"),
        "empty": ("", "empty"),
        "not-a-log": ('{"t": 0.1, "query-migrate": {}}\n', "not a vmig timeline log"),
        "other-version": ('{"vmig-timeline": 99}\n', "another format version"),
        "header-only": (HEADER, "no query-migrate sample"),
        "backwards": (HEADER + SAMPLE % (2, 5, 1) + SAMPLE % (1, 4, 1), ":3: time goes backwards"),
        "bad-time": (HEADER + '{"t": "soon", "query-migrate": {}}\n', ":2: no time"),
        "negative-time": (HEADER + '{"t": -5, "query-migrate": {}}\n', ":2: no time"),
        "bad-record": (HEADER + '{"t": 1, "query-migrate": [1, 2]}\n', ":2: "),
        "unknown-record": (HEADER + '{"t": 1, "weather": "fine"}\n', ":2: neither"),
        "not-an-object": (HEADER + '[1, 2, 3]\n', ":2: not a JSON object"),
        "long-line": (HEADER + '{"t": 1, "x": "' + "a" * (2 << 20) + '"}\n', ":2: line longer"),
    }
    for name, (text, says) in cases.items():
        log = write(os.path.join(d, name + ".log"), text)
        out = os.path.join(d, name + ".svg")
        r = redraw(build, log, out)
        check(r.returncode == 1, "%s: exit %d (%s)" % (name, r.returncode, r.stderr[-300:]))
        check(says in r.stderr and log in r.stderr, "%s: unclear error %r" % (name, r.stderr[-300:]))
        check(not os.path.exists(out), "%s: a picture was drawn anyway" % name)
    r = redraw(build, os.path.join(d, "missing.log"), os.path.join(d, "m.svg"))
    check(r.returncode == 1 and "cannot open" in r.stderr, "missing log: %r" % r.stderr)
    for args in ([], ["x.log"], ["-o", "x.svg"], ["a.log", "b.log", "-o", "x.svg"]):
        r = subprocess.run([cli(build), "timeline"] + args, capture_output=True, text=True,
                           timeout=30)
        check(r.returncode == 2, "vmig timeline %s: exit %d" % (" ".join(args), r.returncode))
    r = subprocess.run([cli(build), "migrate", "a", "b", "--timeline-log", "x"],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 2 and "--timeline" in r.stderr, "--timeline-log alone: %r" % r.stderr)


def case_hostile_values(procs, build):
    """Odd but valid JSON (markup in strings, huge and negative numbers,
    wrong types, missing fields, half a UTF-8 character at a cut) still
    draws a well-formed picture, with the text escaped."""
    d = procs.tmpdir()
    odd = "<b>&\"'\u00e9\u20ac\uffff" + "\u00e9" * 40
    lines = [json.dumps({"vmig-timeline": 1, "started": "<now>", "uri": "tcp:<x>&\"y\":1"})]
    lines.append(json.dumps({"t": 0, "parameters": {"downtime-limit": "soon", "max-bandwidth": -1}}))
    lines.append(json.dumps({"t": 0.1, "query-migrate": {"status": odd}}))
    lines.append(json.dumps({"t": 0.2, "query-migrate": {"status": "active", "ram": "none"}}))
    lines.append(json.dumps({"t": 0.3, "query-migrate": {
        "status": "active", "expected-downtime": 1e300,
        "ram": {"mbps": -5, "remaining": 2 ** 63 - 1, "dirty-pages-rate": 1e18, "page-size": 1e18,
                "dirty-sync-count": 1e300, "postcopy-requests": "many"}}}))
    lines.append(json.dumps({"t": 0.35, "event": {"event": "MIGRATION_PASS", "data": {"pass": 1e300}}}))
    lines.append(json.dumps({"t": 0.4, "event": {"event": "MIGRATION", "data": {"status": odd * 3}}}))
    lines.append(json.dumps({"t": 0.5, "event": {"event": "STOP", "timestamp": "never"}}))
    lines.append(json.dumps({"t": 0.6, "query-migrate": {
        "status": "failed", "downtime": 12, "error-desc": "</text><script>alert(1)</script>" + odd * 8}}))
    log = write(os.path.join(d, "odd.log"), "\n".join(lines) + "\n")
    out = os.path.join(d, "odd.svg")
    r = redraw(build, log, out)
    check(r.returncode == 0, "exit %d: %s" % (r.returncode, r.stderr))
    root = parse_svg(out)
    check_series(root, {})
    check(not list(root.iter(SVG_NS + "script")), "markup from the log became an element")
    texts = " ".join(t.text or "" for t in root.iter(SVG_NS + "text"))
    check("<script>" in texts and "tcp:<x>&" in texts, "escaped text not found: %r" % texts[:300])
    render(out, d, {})
    # A long run is thinned, not refused: 30000 samples, one status.
    many = HEADER + "".join(SAMPLE % (i / 10, 10 ** 9 - i, i // 100) for i in range(30000))
    log = write(os.path.join(d, "long.log"), many)
    r = redraw(build, log, out)
    check(r.returncode == 0, "long log: exit %d: %s" % (r.returncode, r.stderr))
    pts = int(by_id(parse_svg(out))["series-remaining"].get("data-points"))
    check(1000 < pts <= 8192, "long log drawn with %d points" % pts)


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    r.run("timeline-precopy", case_precopy, r.build)
    r.run("timeline-postcopy", case_postcopy, r.build)
    r.run("timeline-cancel-and-failure", case_cancel_and_failure, r.build)
    r.run("timeline-bad-logs", case_bad_logs, r.build)
    r.run("timeline-hostile-values", case_hostile_values, r.build)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
