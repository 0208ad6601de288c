"""The `retro-jax` dispatcher: help, unknown commands, a missing stage reported instead of faked; CI runs the
README's test command."""
import sys

import pytest

from retro_jax import cli


def test_help_lists_every_subcommand(capsys):
  assert cli.main([]) == 0
  out = capsys.readouterr().out
  for name in ("generate", "search", "sft", "dpo", "eval", "demo"):
    assert f"  {name}" in out


def test_unknown_command_fails(capsys):
  assert cli.main(["frobnicate"]) == 2
  assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_missing_stage_says_so(monkeypatch, capsys):
  monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("retro_jax.no_such_stage", "main", "never built"))
  assert cli.main(["ghost"]) == 2
  assert "not built yet" in capsys.readouterr().err


def test_a_real_import_error_inside_a_stage_is_not_hidden(monkeypatch, tmp_path):
  (tmp_path / "broken_stage.py").write_text("import module_that_does_not_exist\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(cli.SUBCOMMANDS, "broken", ("broken_stage", "main", "imports something missing"))
  with pytest.raises(ModuleNotFoundError):
    cli.main(["broken"])
  sys.modules.pop("broken_stage", None)


def test_ci_runs_the_readme_test_command_verbatim():
  # CI must run what a user is told to run: the README's test block is the last line of .ci/run
  from tests.pod import REPO_ROOT  # pylint: disable=import-outside-toplevel
  readme = (REPO_ROOT / "README.md").read_text()
  block = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
  ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
  assert "python -m pytest tests" in block
  assert ci_lines[-1] == block
