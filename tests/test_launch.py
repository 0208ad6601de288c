"""launch/: every example in launch/README.md runs against a fake `gcloud` that records its arguments, and the
`retro-jax` command each `run.sh` example carries to the workers parses under `--dry-run`."""
import json
import os
import re
import shlex
import stat
import subprocess

import pytest

from retro_jax import cli
from tests.pod import REPO_ROOT

FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
if sys.argv[1:4] == ["config", "get-value", "project"]:
    print("fake-project")
    sys.exit(0)
with open(os.environ["GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def readme_examples() -> list[str]:
  block = re.search(r"```bash\n(.*?)```", (REPO_ROOT / "launch" / "README.md").read_text(), re.S).group(1)
  return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("launch/")]


EXAMPLES = readme_examples()


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(tmp_path / "calls"),
             TPU_NAME="retro-7b", ACCELERATOR_TYPE="v5p-32", ZONE="us-east5-a", REPO_URL="https://example.org/r.git")
  env.pop("PROJECT", None)

  def run(line: str) -> list[list[str]]:
    log = tmp_path / "calls"
    log.write_text("")
    subprocess.run(["bash", "-c", line], check=True, env=env, cwd=str(REPO_ROOT), capture_output=True, timeout=60)
    return [json.loads(call) for call in log.read_text().splitlines()]
  return run


def _flag(call: list[str], name: str) -> str:
  return next(arg.split("=", 1)[1] for arg in call if arg.startswith(f"--{name}="))


def test_the_readme_shows_every_script():
  scripts = {line.split()[0] for line in EXAMPLES}
  assert scripts == {f"launch/{p.name}" for p in (REPO_ROOT / "launch").glob("*.sh")} - {"launch/common.sh"}


@pytest.mark.parametrize("line", EXAMPLES)
def test_readme_example_calls_gcloud_as_intended(line, fake_gcloud, capsys):
  calls = fake_gcloud(line)
  assert calls, line
  for call in calls:
    assert _flag(call, "zone") == "us-east5-a" and _flag(call, "project") == "fake-project"
  script = line.split()[0]
  if script == "launch/create.sh":
    assert calls[0][:4] == ["compute", "tpus", "queued-resources", "create"] and "--spot" in calls[0]
    assert _flag(calls[0], "accelerator-type") == "v5p-32" and _flag(calls[0], "node-id") == "retro-7b"
  if script in ("launch/setup.sh", "launch/run.sh", "launch/stop.sh", "launch/status.sh"):
    ssh = [c for c in calls if c[3] == "ssh"][-1]
    assert ssh[4] == "retro-7b" and _flag(ssh, "worker") == "all"
  if script == "launch/setup.sh":
    command = _flag(calls[0], "command")
    assert "'jax[tpu]==0.10.2'" in command and "gcsfuse --implicit-dirs my-bucket /mnt/bucket" in command
  if script == "launch/run.sh":
    command = _flag(calls[0], "command")
    run_id = line.split()[2]
    assert f"/{run_id}/worker-" in command and ".log" in command and ".pid" in command
    carried = shlex.split(re.search(r"nohup retro-jax (.*?) >", command).group(1))
    assert carried == shlex.split(line)[3:]  # the command reaches the workers unchanged
    assert cli.main([*carried, "--dry-run"]) == 0, capsys.readouterr().err
  if script == "launch/tail.sh":
    assert _flag(calls[0], "worker") == "0" and "tail -n 50" in _flag(calls[0], "command")
  if script == "launch/delete.sh":
    assert calls[0][:4] == ["compute", "tpus", "queued-resources", "delete"]


def test_scripts_refuse_missing_arguments(fake_gcloud):
  for line in ("launch/run.sh", "launch/tail.sh", "launch/stop.sh", "launch/setup.sh --mount gs://b"):
    with pytest.raises(subprocess.CalledProcessError) as error:
      fake_gcloud(line)
    assert error.value.returncode == 2 and b"usage" in error.value.stderr
