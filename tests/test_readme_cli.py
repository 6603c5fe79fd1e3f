"""The README's command table is the one generated from the argparse parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from tracin_jax.clidoc import END, START, cli_table, readme_block, synopsis

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_cli_table_matches_parser():
    block = readme_block(README.read_text(encoding="utf-8"))
    assert block is not None, (
        f"README.md lacks the {START} ... {END} markers around the command table; add them and "
        "paste the output of `python -m tracin_jax.clidoc` between them")
    expected = cli_table()
    assert block == expected, (
        "README.md's command table is out of date with the argparse parser in tracin_jax/cli.py: "
        f"run `python -m tracin_jax.clidoc` and paste its output between {START} and {END}\n"
        f"--- README\n{block}--- generated\n{expected}")


def test_synopsis_forms():
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("stage", help="does a | thing")
    s.add_argument("--out", required=True)
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--flag", action="store_true")
    s.add_argument("--dirs", nargs="+", metavar="DIR", required=True)
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("-n", "--processes", type=int, required=True)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    assert synopsis("stage", s) == ("tracin-jax stage --out OUT [--k K] [--flag] --dirs DIR [DIR ...] "
                                    "[--set KEY=VALUE ...] -n PROCESSES -- REST ...")
    table = cli_table(p)
    assert table.splitlines()[0] == "| command | what it does |"
    assert table.splitlines()[2].endswith("| does a \\| thing |")  # pipes escaped in cells
