"""Assemble docs/reproductions.md from the per-operator tables the quality scripts write.

    python benchmarks/quality/collect.py

Each ``benchmarks/quality/<op>.py`` regenerates ``docs/reproductions/<op>.md`` (one command
each); this script only gathers them, in a fixed order, under one page with a summary line per
operator taken from the tables themselves.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["lines", "bang", "soups", "antidote", "transfer", "graft", "spectral"]
SCRIPTS = {name: f"benchmarks/quality/{name}.py" for name in ORDER}


def main() -> None:
    parts = [
        "# Reproductions",
        "",
        "Each operator's paper effect, measured on the testbeds (`weightsmith testbed minilm|tinylm`)",
        "over 3 seeds (mean ± std). Every table below is written by one command, given above it;",
        "this page is assembled by `python benchmarks/quality/collect.py`. Where an effect did not",
        "reproduce, the table says so.",
        "",
    ]
    for name in ORDER:
        path = ROOT / "docs" / "reproductions" / f"{name}.md"
        if not path.exists():
            parts += [f"## {name}", "", f"Not generated yet: run `python {SCRIPTS[name]}`.", ""]
            continue
        text = path.read_text().strip()
        # Demote the table's own title one level so the page has one h1.
        lines = ["#" + line if line.startswith("#") else line for line in text.splitlines()]
        parts += [*lines, "", f"Regenerate: `python {SCRIPTS[name]}`", ""]
    (ROOT / "docs" / "reproductions.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'docs' / 'reproductions.md'}")


if __name__ == "__main__":
    main()
