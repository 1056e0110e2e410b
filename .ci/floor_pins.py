#!/usr/bin/env python3
"""Prints pip requirement pins `name==X` for every `name>=X` in pyproject.toml's
`[project] dependencies`, so the floors CI installs are the floors the package declares.

`jaxlib` is pinned with `jax` (they are released in lockstep; jax pins its jaxlib).
A dependency listed in UNPINNED is emitted as declared (`name>=X`) instead, with the
reason printed to stderr. Anything that is not a plain `name>=X` is an error: a new
dependency must get a floor.

Usage: python3 .ci/floor_pins.py [pyproject.toml] > pins.txt   (stdlib only)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# name -> why CI cannot install exactly its floor.
UNPINNED = {
    "pillow": "Pillow 9.0 has no wheels for CPython >= 3.11 (the CI interpreter); the "
              "newest Pillow is used (samjax needs only Image.open/fromarray/resize/save)",
}


def dependency_floors(pyproject: str) -> list[tuple[str, str, str]]:
  """[(name, floor, requirement string)] from the `dependencies = [...]` list."""
  project = re.search(r"^\[project\]\s*$(.*?)(?=^\[)", pyproject + "\n[", re.M | re.S)
  if not project:
    raise SystemExit("no [project] table in pyproject.toml")
  block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", project.group(1), re.M | re.S)
  if not block:
    raise SystemExit("no `dependencies = [` ... `]` list in [project]")
  out = []
  for line in block.group(1).splitlines():
    line = line.split("#", 1)[0].strip().rstrip(",").strip()
    if not line:
      continue
    m = re.fullmatch(r'"([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.]*)"', line)
    if not m:
      raise SystemExit(f"dependency {line} is not of the form \"name>=X\": give it a floor")
    out.append((m.group(1).lower(), m.group(2), m.group(0).strip('"')))
  if not out:
    raise SystemExit("empty dependencies list")
  return out


def main() -> int:
  path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
  for name, floor, requirement in dependency_floors(path.read_text()):
    if name in UNPINNED:
      print(f"floor_pins: {requirement} left unpinned: {UNPINNED[name]}", file=sys.stderr)
      print(requirement)
      continue
    print(f"{name}=={floor}")
    if name == "jax":
      print(f"jaxlib=={floor}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
