#!/usr/bin/env python3
"""Fails when the top-level modules of src/ import each other in a circle.

Lists every `crate::NAME` path in each top-level module's files (a `use`
line, a `use crate::{a, b}` group, or a path written inline) as an edge from
that module to NAME, then looks for a cycle in those edges. `lib.rs` and
`main.rs` are the roots and are left out: they wire everything together.

Usage: python3 scripts/check-module-cycles.py [--edges] [SRC_DIR]
  --edges   also print every edge (module -> module: files)
Exit 0: no cycle; 1: a cycle (printed with the files behind each edge).
"""

import re
import sys
from pathlib import Path

ROOT_FILES = {"lib.rs", "main.rs"}
# `crate::name` anywhere, and the names of a `crate::{a, b::c, ...}` group.
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
GROUP = re.compile(r"\bcrate::\{([^}]*)\}", re.S)
LINE_COMMENT = re.compile(r"//.*")


def top_module(src: Path, file: Path) -> str | None:
    rel = file.relative_to(src)
    if len(rel.parts) == 1:
        if rel.name in ROOT_FILES:
            return None
        return rel.stem
    return rel.parts[0]


def edges_of(src: Path) -> dict[tuple[str, str], set[str]]:
    modules = {top_module(src, f) for f in src.rglob("*.rs")} - {None}
    edges: dict[tuple[str, str], set[str]] = {}
    for file in sorted(src.rglob("*.rs")):
        here = top_module(src, file)
        if here is None:
            continue
        text = LINE_COMMENT.sub("", file.read_text())
        names = set(PATH.findall(text))
        for group in GROUP.findall(text):
            names.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
        for name in names:
            if name in modules and name != here:
                edges.setdefault((here, name), set()).add(str(file.relative_to(src)))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    src = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "src"
    edges = edges_of(src)
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    if "--edges" in sys.argv:
        for (a, b), files in sorted(edges.items()):
            print(f"{a} -> {b}: {', '.join(sorted(files))}")
    cycle = find_cycle(graph)
    if cycle is None:
        print(f"no import cycle between the {len({m for e in edges for m in e})} top-level modules of {src}")
        return 0
    print("import cycle: " + " -> ".join(cycle), file=sys.stderr)
    for a, b in zip(cycle, cycle[1:]):
        print(f"  {a} -> {b}: {', '.join(sorted(edges[(a, b)]))}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
