"""Command-line configs, the same way for every subcommand: an ml_collections config (a file's `get_config()`
via `--config FILE.py[:ARG]`, or the subcommand's default), `--config.key=value` overrides, and shortcut flags
(`--model DIR` for `--config.model=DIR`).

Flags live in a private `FlagValues` per call, so subcommands that share flag names (`--input`, `--model`) can
run in one process (the demo, the tests) without absl's global registry clashing. Every flag mistake (an unknown
flag or key, a value of the wrong type, a missing config file) becomes one `UserError` line.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from retro_jax.user_errors import UserError

# A shortcut flag: (dotted config key it sets, absl DEFINE_* function, help text).
Shortcut = tuple[str, Callable, str]


def config_file_arg(argv: Sequence[str]) -> str | None:
  """The value of `--config` (not `--config.<key>`), if given."""
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and index + 1 < len(argv):
      return argv[index + 1]
  return None


def set_dotted(config: ml_collections.ConfigDict, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value


def parse_config(argv: Sequence[str], *, prog: str, default: ml_collections.ConfigDict | None = None,
                 shortcuts: Mapping[str, Shortcut] | None = None, lock_config: bool = False,
                 define_extra: Callable[[flags.FlagValues], None] | None = None,
                 ) -> tuple[ml_collections.ConfigDict | None, flags.FlagValues]:
  """Parses `argv` (without the program name). Returns the config (None when there is neither `--config` nor a
  default) and the FlagValues (for flags added by `define_extra`). Raises UserError on an unknown flag or key,
  an unparsable value, extra arguments or a missing config file."""
  path = config_file_arg(argv)
  if path and not os.path.isfile(path.split(":", 1)[0]):
    raise UserError(f"config file {path.split(':', 1)[0]!r} does not exist", "check --config")
  try:
    return _parse(argv, prog, path, default, shortcuts, lock_config, define_extra)
  except (AttributeError, KeyError) as error:  # config_flags' unknown key: a KeyError inside an AttributeError
    raise UserError(*_unknown_key(error, argv)) from None
  except (flags.Error, ValueError) as error:  # unknown flag, extra arguments, a value of the wrong type
    raise UserError(str(error).replace("\n", " "), f"see `{prog} --help`") from None


def _unknown_key(error: Exception, argv: Sequence[str]) -> tuple[str, str]:
  """(problem, fix) for a misspelled config key; config_flags nests the message in KeyError reprs."""
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  key = text.split("\n", 1)[0].strip("'\"")
  flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
               a.split("=", 1)[0].rsplit(".", 1)[-1] == key), f"--config...{key}")
  hint = re.search(r'Did you mean "([^"]+)"', text)
  suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
  return f"unknown config key {flag}{suggestion}", "check its spelling against the config's keys (--help prints the defaults)"


def _parse(argv, prog, path, default, shortcuts, lock_config, define_extra):
  sys_argv = [prog, *argv]
  values = flags.FlagValues()
  if path or default is None:
    holder = config_flags.DEFINE_config_file("config", path, flag_values=values, sys_argv=sys_argv,
                                             lock_config=lock_config, help_string="experiment config (.py file)")
  else:
    holder = config_flags.DEFINE_config_dict("config", default, flag_values=values, sys_argv=sys_argv,
                                             lock_config=lock_config)
  defined = {name: (key, define(name, None, text, flag_values=values))
             for name, (key, define, text) in (shortcuts or {}).items()}
  if define_extra is not None:
    define_extra(values)
  leftover = values(sys_argv)
  if len(leftover) > 1:
    raise flags.Error(f"unexpected arguments {leftover[1:]} (use --config.key=value)")
  config = holder.value
  if config is not None:
    for key, flag in defined.values():
      if flag.value is not None:
        set_dotted(config, key, flag.value)
  return config, values
