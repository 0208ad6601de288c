"""Headless Chromium on a report: the rendered DOM after the page's script ran, or a screenshot.

The tests check the report in a real browser and `benchmarks/view.py` times its load, both through this one
command line (Debian's `chromium`; `apt-get install chromium`). `--virtual-time-budget` lets the page's timers
and chunk loads finish before the DOM is dumped; the page sets `data-ready` on <body> once a view is rendered.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import urllib.parse

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars")


class BrowserMissing(RuntimeError):
  """No `chromium` on the PATH."""


def chromium_path() -> str:
  path = shutil.which("chromium") or shutil.which("chromium-browser")
  if path is None:
    raise BrowserMissing("no chromium on the PATH: install Debian's `chromium` (apt-get install chromium)")
  return path


def file_url(path: str, fragment: str = "") -> str:
  """A file:// URL of `path` with the view's state in the fragment (e.g. "status=revised")."""
  url = pathlib.Path(path).resolve().as_uri()
  return f"{url}#{urllib.parse.quote(fragment, safe='=&,;')}" if fragment else url


class BrowserTimeout(RuntimeError):
  """Chromium did not finish in time; it and every process it started were killed."""


def _run(arguments: list[str], timeout_s: float) -> str:
  """Chromium's stdout. It runs in its own process group, so that a timeout ends its renderers too."""
  with tempfile.TemporaryDirectory(prefix="retro_view_chromium_") as profile:
    command = [chromium_path(), *FLAGS, f"--user-data-dir={profile}", *arguments]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
      try:
        stdout, stderr = process.communicate(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise BrowserTimeout(f"chromium did not finish in {timeout_s:.0f} s") from None
  if process.returncode != 0:
    raise RuntimeError(f"chromium exited {process.returncode}: {stderr[-2000:]}")
  return stdout


def dump_dom(url: str, budget_ms: int = 10_000, timeout_s: float = 120) -> str:
  """The serialized DOM of `url` once its scripts ran (up to `budget_ms` of virtual time)."""
  return _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout_s)


def screenshot(url: str, path: str, width: int = 1280, height: int = 1000, budget_ms: int = 10_000,
               timeout_s: float = 120) -> None:
  """A PNG of the top `width` x `height` pixels of `url`."""
  _run([f"--virtual-time-budget={budget_ms}", f"--window-size={width},{height}",
        f"--screenshot={pathlib.Path(path).resolve()}", url], timeout_s)
