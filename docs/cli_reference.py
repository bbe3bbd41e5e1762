"""Write docs/cli.md from the `lora-da` argument parser, so the reference lists exactly the flags the command has.

    python docs/cli_reference.py          # rewrite docs/cli.md
    python docs/cli_reference.py --check  # exit 1 if docs/cli.md differs from the parser
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_da.cli.parser import build_parser

PAGE = Path(__file__).with_name("cli.md")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flag_row(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.dest.upper()}`"
    if isinstance(action, argparse.BooleanOptionalAction):
        names = " / ".join(f"`{name}`" for name in action.option_strings)
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        names += " {" + ", ".join(str(choice) for choice in action.choices) + "}"
    text = (action.help or "") % {"default": action.default, "prog": parser.prog}
    return f"| {names} | {' '.join(text.split()).replace('|', '&#124;')} |"


def _command_section(name: str, parser: argparse.ArgumentParser) -> list[str]:
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
    lines = [f"## `lora-da {name}`", "", " ".join((parser.description or "").split()), "", "```text", usage,
             "```", ""]
    for group in parser._action_groups:
        rows = [_flag_row(a, parser) for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if rows:
            title = "options" if group.title in ("optional arguments", "options") else group.title
            lines += [f"**{title}**", "", "| flag | meaning |", "| --- | --- |", *rows, ""]
    return lines


def render() -> str:
    """The reference page as markdown."""
    parser = build_parser()
    lines = [
        "# Command line",
        "",
        "<!-- Generated from the argument parser by docs/cli_reference.py; edit the parser, then rerun it. -->",
        "",
        " ".join((parser.description or "").split()),
        "",
        "Every error is one `lora-da: error: ...` line and exit status 1 (130 when interrupted); "
        "see [Troubleshooting](troubleshooting.md).",
        "",
    ]
    for name, sub in _subcommands(parser).items():
        lines += _command_section(name, sub)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is out of date: run python docs/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
