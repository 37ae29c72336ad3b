#!/usr/bin/env python3
"""The crate's import graph, one node per file of src/: which files each file imports from the
crate (`use crate::..`, `use super::..` and inline `crate::`/`super::` paths; unit-test modules
left out), and the circles in it (groups of files that import each other, directly or not).

    python3 docs/import_graph.py            # each file's imports, then the circles
    python3 docs/import_graph.py --check    # only the circles; exit 1 if there is any

A `mod.rs` declaring its children is not an import. Paths relative to the current module
(`use child::x` in a mod.rs) point down, so they are not followed.
"""
import argparse
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_of(path: Path) -> tuple:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def code_of(path: Path) -> str:
    """The file without its unit tests (`#[cfg(test)] mod tests`, always last) and comments."""
    text = path.read_text()
    tests = re.search(r"#\[cfg\(test\)\]\s*mod tests\b", text)
    if tests:
        text = text[: tests.start()]
    return re.sub(r"//[^\n]*", "", text)


def expand(tree: str) -> list:
    """`a::{b, c::{d, self}}` -> ['a::b', 'a::c::d', 'a::c']."""
    tree = re.sub(r"\s+", "", tree)
    start = tree.find("{")
    if start < 0:
        return [tree]
    prefix, inner = tree[:start], tree[start + 1 : tree.rfind("}")]
    items, depth, current = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        current += ch
    items.append(current)
    paths = []
    for item in filter(None, items):
        for sub in expand(item):
            paths.append(prefix.rstrip(":") if sub == "self" else prefix + sub)
    return paths


def resolve(module: tuple, path: str, modules: set):
    """The module (file) a path names: the longest prefix of it that is a file of the crate."""
    parts = [p for p in path.split(" as ")[0].split("::") if p]
    if not parts or parts[0] not in ("crate", "super", "self"):
        return None
    base, rest = list(module), parts
    if rest[0] == "crate":
        base, rest = [], rest[1:]
    while rest and rest[0] in ("super", "self"):
        if rest[0] == "super":
            base = base[:-1]
        rest = rest[1:]
    for n in range(len(rest), -1, -1):
        candidate = tuple(base) + tuple(rest[:n])
        if candidate in modules:
            return candidate
    return None


def graph():
    files = {module_of(p): p for p in sorted(SRC.rglob("*.rs")) if p.name != "main.rs"}
    edges = {}
    for module, path in files.items():
        code = code_of(path)
        paths = [p for use in re.findall(r"\buse\s+([^;]+);", code) for p in expand(use)]
        paths += re.findall(r"\b(?:crate|super)(?:::[A-Za-z_][A-Za-z_0-9]*)+", code)
        # In a file that is not a mod.rs, `super` is the folder's module: its own module
        # path minus one, which `resolve` computes from the file's module path.
        targets = {resolve(module, p, set(files)) for p in paths}
        edges[module] = sorted(t for t in targets if t is not None and t != module)
    return files, edges


def circles(edges):
    """Tarjan's strongly connected components of more than one node."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def name(module: tuple) -> str:
    return "::".join(module) or "lib"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if there is any circle")
    args = parser.parse_args()
    files, edges = graph()
    if not args.check:
        for module, targets in edges.items():
            path = files[module].relative_to(SRC.parent)
            print(f"{path}: {', '.join(name(t) for t in targets) or '-'}")
        print()
    found = circles(edges)
    print(f"import circles in src/: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(name(m) for m in component))
    if args.check and found:
        sys.exit(1)


if __name__ == "__main__":
    main()
