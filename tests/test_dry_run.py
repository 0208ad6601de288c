"""`--dry-run` on every subcommand, and every `retro-jax` command line the docs show parses under it.

The collector reads README.md, launch/README.md, the configs/ docstrings and the colab/ notebooks; a line ending
in a backslash continues on the next, `...` means "the rest as above", a notebook's `{variable}` is a path (an
upper-case `{CONSTANT}` a number), and a bare name in backticks (`retro-jax sft` in a table) is a mention, not a
command line.
"""
import json
import re
import shlex

import pytest

from retro_jax import cli
from tests.pod import REPO_ROOT

COMMAND = re.compile(r"retro-jax\s+(" + "|".join(map(re.escape, cli.SUBCOMMANDS)) + r")\b([^`#|&\n]*)")


def _texts() -> dict[str, str]:
  texts = {name: (REPO_ROOT / name).read_text() for name in ("README.md", "launch/README.md")}
  texts.update({str(p.relative_to(REPO_ROOT)): p.read_text() for p in sorted((REPO_ROOT / "configs").glob("*.py"))})
  for notebook in sorted((REPO_ROOT / "colab").glob("*.ipynb")):
    cells = json.loads(notebook.read_text())["cells"]
    texts[str(notebook.relative_to(REPO_ROOT))] = "\n".join("".join(cell["source"]) for cell in cells)
  return texts


def _fill_notebook_variables(text: str) -> str:
  """A notebook's upper-case `{CONSTANT}` (sizes computed in an earlier cell) is a number; any other `{name}` a path."""
  return re.sub(r"\{\w+\}", "/content/model", re.sub(r"\{[A-Z_]+\}", "8", text))


def documented_commands() -> list[tuple[str, list[str]]]:
  commands = []
  for source, text in _texts().items():
    text = re.sub(r"\\\n\s*", " ", text)
    for match in COMMAND.finditer(text):
      if not match.group(2).strip() and text[match.end():match.end() + 1] == "`":
        continue
      args = [a for a in shlex.split(_fill_notebook_variables(match.group(2))) if a != "..."]
      commands.append((source, [match.group(1), *args]))
  return commands


COMMANDS = documented_commands()


def test_the_docs_show_every_subcommand():
  assert {argv[0] for _, argv in COMMANDS} == set(cli.SUBCOMMANDS)
  assert len(COMMANDS) >= 15


@pytest.mark.parametrize("source,argv", COMMANDS, ids=[f"{s}:{' '.join(a)[:60]}" for s, a in COMMANDS])
def test_documented_command_parses_under_dry_run(source, argv, monkeypatch, capsys):
  monkeypatch.chdir(REPO_ROOT)  # the docs' paths are relative to the repository
  assert cli.main([*argv, "--dry-run"]) == 0, (source, capsys.readouterr().err)
  assert "--dry-run: parses" in capsys.readouterr().out


def test_dry_run_resolves_without_loading_and_warns_about_missing_paths(monkeypatch, capsys):
  monkeypatch.setenv("RETRO_JAX_COORDINATOR_ADDRESS", "10.0.0.2:8476")
  monkeypatch.setenv("RETRO_JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("RETRO_JAX_PROCESS_ID", "3")
  model = str(REPO_ROOT / "retro_jax" / "assets" / "tiny_reasoner")
  assert cli.main(["search", "--model", model, "--input", "/no/such/traces.jsonl", "--output", "out.jsonl",
                   "--config.engine.tensor=2", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "process group: process 3 of 4, coordinator 10.0.0.2:8476" in out
  assert "engine.tensor = 2" in out and "4 layers, d 192, 6/2 heads, vocab 405" in out
  assert "[warning] input=/no/such/traces.jsonl does not exist here" in out


@pytest.mark.parametrize("argv,message", [
    (["search", "--config.search.no_such_key=1"], "no_such_key"),
    (["sft", "--config", "configs/tiny_reasoner_sft.py", "--config.batch_size=x"], "batch_size"),
    (["demo", "--seed", "x"], ""),
])
def test_dry_run_of_a_bad_command_line_exits_2(argv, message, monkeypatch, capsys):
  monkeypatch.chdir(REPO_ROOT)
  assert cli.main([*argv, "--dry-run"]) == 2
  assert message in capsys.readouterr().err
