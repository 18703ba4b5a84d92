#!/usr/bin/env python3
"""The import graph of the crate's top-level modules, and a cycle check.

    scripts/module-graph.py [--with-tests]

Reads src/ as text: every `crate::<module>` path (also inside
`use crate::{a, b::C}` groups) in a file under src/<module>.rs or
src/<module>/ is an edge <module> -> <target>. `#[cfg(test)]` code is left
out unless --with-tests: inline `mod tests { ... }` blocks and files declared
by `#[cfg(test)] mod name;`. Prints one line per module, then the cycles
(strongly connected components of more than one module, or a module that
uses itself); exits 1 if there is one.
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
WITH_TESTS = "--with-tests" in sys.argv[1:]


def top_module(rel):
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def strip_test_blocks(text):
    """Removes `#[cfg(test)] mod x { ... }` blocks (brace-matched)."""
    out, i = [], 0
    pattern = re.compile(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{")
    while True:
        m = pattern.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j


def test_files(path, text):
    """Files that `#[cfg(test)] mod name;` in `path` declares."""
    here = os.path.dirname(path)
    base = os.path.basename(path)
    own_dir = here if base in ("mod.rs", "lib.rs", "main.rs") else os.path.join(here, base[:-3])
    out = set()
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*mod\s+(\w+)\s*;", text):
        for candidate in (os.path.join(own_dir, m[1] + ".rs"), os.path.join(own_dir, m[1], "mod.rs")):
            out.add(os.path.normpath(candidate))
    return out


def crate_paths(text):
    """Top-level module names after every `crate::`, including `crate::{a, b}`."""
    names = set()
    for m in re.finditer(r"\bcrate::(\{|\w+)", text):
        if m[1] != "{":
            names.add(m[1])
            continue
        depth, j = 1, m.end()
        start = j
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        group = text[start : j - 1]
        # Names at the group's top level: before any `::` or `{`.
        level, token = 0, ""
        for ch in group + ",":
            if ch == "{":
                level += 1
            elif ch == "}":
                level -= 1
            elif ch == "," and level == 0:
                name = re.match(r"\s*(\w+)", token)
                if name:
                    names.add(name[1])
                token = ""
                continue
            if level == 0:
                token += ch
    return names


def main():
    files = []
    for dirpath, _, names in os.walk(ROOT):
        for n in names:
            if n.endswith(".rs"):
                files.append(os.path.normpath(os.path.join(dirpath, n)))
    texts = {f: open(f, encoding="utf-8").read() for f in files}
    skip = set()
    if not WITH_TESTS:
        for f, t in texts.items():
            skip |= test_files(f, t)
        # Files below a skipped file's own directory are test code too.
        changed = True
        while changed:
            changed = False
            for f, t in texts.items():
                if f not in skip and any(f.startswith(s[:-3] + os.sep) for s in skip):
                    skip.add(f)
                    changed = True
    modules = sorted({top_module(os.path.relpath(f, ROOT)) for f in files} - {"main", "lib"})
    graph = {m: set() for m in modules}
    for f in sorted(files):
        if f in skip:
            continue
        rel = os.path.relpath(f, ROOT)
        mod = top_module(rel)
        if mod in ("main", "lib"):
            continue  # lib.rs declares every module; main.rs is another crate
        text = strip_comments(texts[f])
        if not WITH_TESTS:
            text = strip_test_blocks(text)
        for target in crate_paths(text):
            if target == mod:
                continue
            # `crate::start` and other re-exports from lib.rs: resolve them.
            if target not in graph:
                target = {"start": "app", "Running": "app", "StartError": "app"}.get(target, target)
            if target in graph and target != mod:
                graph[mod].add(target)

    label = "with #[cfg(test)] code" if WITH_TESTS else "without #[cfg(test)] code"
    print(f"module import graph ({label}):")
    for m in modules:
        print(f"  {m:<8} -> {', '.join(sorted(graph[m])) or '(leaf)'}")

    # Tarjan's strongly connected components.
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    cycles = [c for c in sccs if len(c) > 1]
    if cycles:
        for c in cycles:
            print("cycle: " + " <-> ".join(c))
        return 1
    order = []
    done = set()

    def topo(v):
        if v in done:
            return
        done.add(v)
        for w in sorted(graph[v]):
            topo(w)
        order.append(v)

    for m in modules:
        topo(m)
    print("no cycle; dependency order (leaves first): " + ", ".join(order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
