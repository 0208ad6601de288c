"""`retro-jax view OUTPUT.jsonl --output report.html`: the HTML report of a search or tree output.

  retro-jax view runs/search/revised.jsonl                       # writes runs/search/revised.html
  retro-jax view revised.jsonl --output report.html --title "R1-7B self-improvement, seed 0"
  retro-jax view big.jsonl --max_inline_mb 20                   # records over 20 MB go to report_data/ beside it
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from retro_jax.view import report

PROG = "retro-jax view"


def argument_parser() -> argparse.ArgumentParser:
  """The command's flags (also what `--dry-run` parses)."""
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("input", help="output JSONL of `retro-jax search` or `retro-jax tree`")
  parser.add_argument("--output", default="", help="the HTML file to write (default: the input with .html)")
  parser.add_argument("--title", default="", help="the page title (default: from the input's name)")
  parser.add_argument("--max_inline_mb", type=float, default=report.DEFAULT_MAX_INLINE_BYTES / 2**20,
                      help="records' data above this many MB goes to <output stem>_data/ beside the page")
  return parser


def view_main(argv: Sequence[str] = ()) -> int:
  """`retro-jax view ARGS`: `argv` holds the arguments after the subcommand. Returns the exit status."""
  args = argument_parser().parse_args(list(argv))
  if args.max_inline_mb < 0:
    print(f"{PROG}: --max_inline_mb must be >= 0", file=sys.stderr)
    return 2
  output = args.output or str(pathlib.Path(args.input).with_suffix(".html"))
  try:
    summary = report.build_report(args.input, output, title=args.title,
                                  max_inline_bytes=int(args.max_inline_mb * 2**20))
  except report.ViewInputError as error:
    print(f"{PROG}: {error}", file=sys.stderr)
    return 2
  except OSError as error:  # an output folder that cannot be made or written
    print(f"{PROG}: cannot write {output}: {error.strerror or error}", file=sys.stderr)
    return 2
  statuses = ", ".join(f"{n} {status}" for status, n in sorted(summary.statuses.items(), key=lambda kv: -kv[1]))
  print(f"{output}: {summary.records} records ({statuses}); {summary.html_bytes / 2**20:.1f} MB"
        + (f", records' data in {summary.data_dir} ({summary.chunks} files)" if summary.data_dir else "")
        + f"; built in {summary.build_seconds:.1f} s")
  if summary.unreadable_lines:
    print(f"{PROG}: {summary.unreadable_lines} line(s) of {args.input} are not JSON; the report lists them as "
          "'unreadable'", file=sys.stderr)
  return 0
