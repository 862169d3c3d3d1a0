# SPDX-License-Identifier: MIT
"""Writes a fuzz target's seeds into tests/fuzz/corpus/<target>/, each named
by the SHA-1 of its bytes (as libFuzzer names the inputs it keeps)."""
import hashlib
import os


def write(target, seeds):
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", target)
    os.makedirs(out, exist_ok=True)
    for blob in seeds.values():
        with open(os.path.join(out, hashlib.sha1(blob).hexdigest()), "wb") as f:
            f.write(blob)
    print(f"{len(seeds)} seeds in {out}")
