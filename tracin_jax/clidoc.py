"""The command-line table of the README, generated from the argparse parser.

One row per subcommand: ``tracin-jax NAME`` and a compact synopsis of its options (required
ones plain, optional ones in brackets, repeatable ones followed by ``...``), then the
subcommand's help text. ``python -m tracin_jax.clidoc`` prints the table;
``tests/test_readme_cli.py`` checks that the README holds exactly this text between its
``<!-- cli-table:start -->`` and ``<!-- cli-table:end -->`` markers.
"""

from __future__ import annotations

import argparse

START = "<!-- cli-table:start -->"
END = "<!-- cli-table:end -->"


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    return action.dest.upper()


def _option(action: argparse.Action) -> str:
    """One option as it is typed: ``--flag``, ``--opt VALUE``, ``--opt VALUE [VALUE ...]``."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true, store_const, count, ...
        return flag
    value = _metavar(action)
    if action.nargs == "+":
        value = f"{value} [{value} ...]"
    elif action.nargs == "*":
        value = f"[{value} ...]"
    elif action.nargs == "?":
        value = f"[{value}]"
    elif isinstance(action.nargs, int) and action.nargs > 1:
        value = " ".join([value] * action.nargs)
    text = f"{flag} {value}"
    if isinstance(action, argparse._AppendAction):
        text += " ..."
    return text


def _positional(action: argparse.Action) -> str:
    name = _metavar(action)
    if action.nargs == argparse.REMAINDER:
        return f"-- {name} ..."
    if action.nargs == "+":
        return f"{name} [{name} ...]"
    if action.nargs == "*":
        return f"[{name} ...]"
    if action.nargs == "?":
        return f"[{name}]"
    return name


def synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    """``tracin-jax NAME --req X [--opt Y] [--flag] POSITIONAL`` for one subcommand."""
    parts = [f"tracin-jax {name}"]
    positionals = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings:
            positionals.append(_positional(action))
            continue
        text = _option(action)
        parts.append(text if action.required else f"[{text}]")
    return " ".join(parts + positionals)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def cli_table(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown table of every subcommand of ``parser`` (default: ``tracin-jax``'s)."""
    if parser is None:
        from tracin_jax.cli import build_parser

        parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in subparsers._choices_actions}
    rows = ["| command | what it does |", "| --- | --- |"]
    for name, sub in subparsers.choices.items():
        rows.append(f"| `{_cell(synopsis(name, sub))}` | {_cell(helps.get(name, ''))} |")
    return "\n".join(rows) + "\n"


def readme_block(text: str) -> str | None:
    """The text between the markers in ``text`` (a README), without the marker lines."""
    try:
        start = text.index(START) + len(START)
        end = text.index(END, start)
    except ValueError:
        return None
    return text[start:end].lstrip("\n")


def main() -> None:
    print(cli_table(), end="")


if __name__ == "__main__":
    main()
