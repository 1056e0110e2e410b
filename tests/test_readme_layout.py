"""The README's layout table names every module and package of `samjax/`."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_table() -> str:
  text = (ROOT / "README.md").read_text()
  start = text.index("| path | what |")
  end = text.index("\n\n", start)
  return text[start:end]


def test_layout_table_names_every_module():
  table = _layout_table()
  named = set(re.findall(r"`(samjax/[A-Za-z_]+(?:\.py|/))`", table))
  pkg = ROOT / "samjax"
  present = {f"samjax/{p.name}/" for p in pkg.iterdir()
             if p.is_dir() and (p / "__init__.py").exists()}
  present |= {f"samjax/{p.name}" for p in pkg.glob("*.py")
              if p.name not in ("__init__.py", "__main__.py")}
  assert present - named == set(), "not in the README's layout table"
  assert named - present == set(), "in the README's layout table but not in samjax/"
