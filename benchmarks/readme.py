"""Copies benchmarks/results/<name>.md into the README between its result markers.

    python benchmarks/readme.py

The README quotes measured files; it never holds numbers typed by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def splice(readme: str, results: Path) -> str:
    """Replaces each ``<!-- results:NAME -->`` block with results/NAME.md."""

    def fill(m: re.Match) -> str:
        name = m.group(1)
        path = results / f"{name}.md"
        if not path.is_file():
            raise SystemExit(f"README names results '{name}', but {path} does not exist; "
                             f"run benchmarks/{name}.py")
        body = re.sub(r"^(#+) ", r"##\1 ", path.read_text().strip(), flags=re.M)  # nest
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", fill, readme, flags=re.S)


def main() -> int:
    readme = ROOT / "README.md"
    text = splice(readme.read_text(), ROOT / "benchmarks" / "results")
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
