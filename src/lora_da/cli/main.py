"""Entry point of `lora-da`: parse, run the command, turn errors into one line and exit status 1."""

from __future__ import annotations

import sys
import warnings

import transformers

from lora_da.cli.common import PROG
from lora_da.cli.parser import build_parser


def _message(err: BaseException) -> str:
    """One line for an error (KeyError's repr quotes are dropped)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lora-da`; returns the exit status (errors: one line on stderr, status 1)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, KeyError, ImportError) as err:
        print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
