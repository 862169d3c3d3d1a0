#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The folders of lib/ form layers: no include cycle between them.

Each lib/<folder> may include headers of other folders, but the graph of
those includes must have no cycle (lib/postcopy used to include
lib/migrate's internals while lib/migrate called into it). Prints the
graph, and fails naming the cycle if there is one.

usage: layers.py LIB_DIR
"""
import os
import re
import sys

INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z_]+)/[^"]+"', re.M)


def graph(lib):
    g = {}
    for folder in sorted(os.listdir(lib)):
        path = os.path.join(lib, folder)
        if not os.path.isdir(path):
            continue
        deps = set()
        for name in os.listdir(path):
            if name.endswith((".c", ".h")):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    deps.update(INCLUDE.findall(f.read()))
        deps.discard(folder)
        g[folder] = sorted(d for d in deps if os.path.isdir(os.path.join(lib, d)))
    return g


def find_cycle(g):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in g.get(n, ()):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in g:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    g = graph(sys.argv[1])
    for folder, deps in g.items():
        print("lib/%s -> %s" % (folder, ", ".join(deps) or "-"))
    cycle = find_cycle(g)
    if cycle:
        print("FAIL: include cycle between lib folders: %s" % " -> ".join(cycle))
        return 1
    print("PASS: no include cycle between lib folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
