"""Command-line configs, the same way for every subcommand: an ml_collections config (a file's `get_config()`
via `--config FILE.py[:ARG]`, or the subcommand's default), `--config.key=value` overrides, and shortcut flags
(`--model DIR` for `--config.model=DIR`).

Flags live in a private `FlagValues` per call, so subcommands that share flag names (`--input`, `--model`) can
run in one process (the demo, the tests) without absl's global registry clashing.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

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
  default) and the FlagValues (for flags added by `define_extra`). Raises flags.Error on unknown or extra
  arguments; config_flags reports an unknown key as AttributeError/KeyError and a bad value as ValueError."""
  sys_argv = [prog, *argv]
  values = flags.FlagValues()
  path = config_file_arg(argv)
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
