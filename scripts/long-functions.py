#!/usr/bin/env python3
"""Lists the functions in src/ longer than a limit (default 80 lines).

A function runs from its `fn` line to the line of its closing brace (braces
counted outside strings, chars and comments). `#[cfg(test)]` modules count
like any other code; pass --no-tests to leave out files' test modules and
tests.rs files.

Usage: python3 scripts/long-functions.py [--limit N] [--no-tests] [SRC_DIR]
Prints `LINES file:line name`, longest first. Always exits 0: a report.
"""

import re
import sys
from pathlib import Path

FN = re.compile(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?(?:extern\s+\"C\"\s+)?fn\s+([A-Za-z_][A-Za-z0-9_]*)")


def strip(line: str) -> str:
    """The line without string/char literals and // comments."""
    line = re.sub(r'"(?:\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(?:\\.|[^'\\])'", "''", line)
    return line.split("//", 1)[0]


def functions(path: Path, no_tests: bool):
    lines = path.read_text().splitlines()
    test_from = len(lines)
    if no_tests:
        for i, l in enumerate(lines):
            if l.strip() == "#[cfg(test)]":
                test_from = i
                break
    i = 0
    while i < test_from:
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        depth, opened, j = 0, False, i
        while j < len(lines):
            s = strip(lines[j])
            if not opened and ";" in s and "{" not in s:
                break  # a declaration without a body
            depth += s.count("{") - s.count("}")
            opened = opened or "{" in s
            if opened and depth <= 0:
                yield (j - i + 1, i + 1, m.group(1))
                break
            j += 1
        i += 1


def main() -> int:
    args = sys.argv[1:]
    limit = 80
    if "--limit" in args:
        limit = int(args[args.index("--limit") + 1])
        del args[args.index("--limit") : args.index("--limit") + 2]
    no_tests = "--no-tests" in args
    args = [a for a in args if not a.startswith("--")]
    src = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "src"
    found = []
    for path in sorted(src.rglob("*.rs")):
        if no_tests and path.name == "tests.rs":
            continue
        for n, line, name in functions(path, no_tests):
            if n > limit:
                found.append((n, f"{path}:{line}", name))
    for n, where, name in sorted(found, reverse=True):
        print(f"{n:5} {where} {name}")
    print(f"{len(found)} functions over {limit} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
