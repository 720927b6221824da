#!/usr/bin/env python3
"""Lists the Rust functions of the workspace longer than a limit (80 lines by
default), longest first, leaving out tests: `python3 scripts/long_functions.py [N]`.

A function starts at a line holding `fn name(` and ends at the brace that closes the
body; `#[cfg(test)]` modules and the `tests/` folders are skipped. It reads the text,
not the syntax tree, which is enough to watch the trend."""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FN = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)")


def functions(path):
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("#[cfg(test)]"):
            return  # test modules sit at the end of a file
        m = FN.match(line)
        if not m:
            i += 1
            continue
        depth, start, opened = 0, i, False
        j = i
        while j < len(lines):
            code = re.sub(r'"(?:\\.|[^"\\])*"', '""', lines[j].split("//")[0])
            depth += code.count("{") - code.count("}")
            opened = opened or "{" in code
            if opened and depth <= 0:
                break
            if not opened and code.rstrip().endswith(";"):
                break  # a declaration without a body
            j += 1
        if opened:
            yield m.group(1), start + 1, j - start + 1
        i = j + 1


def main():
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    found = []
    for path in sorted(ROOT.glob("*/src/**/*.rs")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("target", "tests"):
            continue
        for name, line, length in functions(path):
            if length > limit:
                found.append((length, f"{rel}:{line}", name))
    for length, where, name in sorted(found, reverse=True):
        print(f"{length:5} {where:45} {name}")
    print(f"{len(found)} functions over {limit} lines")


if __name__ == "__main__":
    main()
