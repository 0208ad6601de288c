"""The bundled tiny reasoner and `retro-jax demo --quick` (every stage of the real pipeline, small), run through
the CPU Colab notebook, which is therefore executed here (and is the one place CI runs the quick demo)."""
import json
import os

import nbclient
import nbformat
import pytest

import retro_jax.cli
from retro_jax import demo
from retro_jax.search import traces as segmentation
from retro_jax.tasks import arithmetic
from retro_jax.tasks.build import BUNDLED_FILES


def test_bundled_model_is_complete_and_small():
  sizes = {name: os.path.getsize(os.path.join(demo.DEFAULT_MODEL, name)) for name in BUNDLED_FILES}
  assert sum(sizes.values()) <= 20 * 2**20, sizes


def test_bundled_model_writes_well_formed_correct_traces():
  from retro_jax.engine.requests import GenerationRequest
  from retro_jax.engine.serving import load_text_generator
  from retro_jax.grading import extract_final_answer
  from retro_jax.tokenization import load_tokenizer

  tokenizer = load_tokenizer(demo.DEFAULT_MODEL)
  _, problems = arithmetic.make_splits(seed=7, n_train=0, n_eval=16)
  generator = load_text_generator(demo.DEFAULT_MODEL, max_concurrent_decodes=16, max_seq_len=512, progress=False)
  requests = [GenerationRequest(prompt_tokens=tuple(tokenizer.encode(tokenizer.render_prompt(p.question))),
                                max_new_tokens=320) for p in problems]
  correct = 0
  for problem, result in zip(problems, generator.generate(requests)):
    completion = result.samples[0]
    assert completion.finish_reason == "eos", completion.text
    parsed = segmentation.parse_trace(completion.text)  # raises when the thinking never closes
    assert parsed.steps and all(step.strip() for step in parsed.steps)
    answer = extract_final_answer(completion.text)
    assert answer is not None, completion.text
    correct += answer == str(problem.answer)
  # Measured: 16 of 16 (and 98.9% greedy accuracy over the demo's 300 held-out problems). The floor allows one
  # miss; a model that lost its arithmetic would miss several.
  assert correct >= 15, f"{correct} of {len(problems)} correct"


NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "colab", "retro_jax_cpu_demo.ipynb")


@pytest.fixture(scope="module")
def quick_demo_notebook(tmp_path_factory):
  """(the demo's output folder, the executed notebook): the notebook as committed, writing to a temporary folder."""
  out = str(tmp_path_factory.mktemp("notebook") / "demo")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  settings = next(cell for cell in notebook.cells if cell.source.startswith("output_dir = "))
  settings.source = settings.source.replace("'/content/demo'", repr(out), 1)
  nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3").execute()
  return out, notebook


def test_cpu_notebook_shows_the_report_plots_and_a_revised_trace(quick_demo_notebook):
  _, notebook = quick_demo_notebook
  outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
  assert any("## Held-out evaluation" in o.get("data", {}).get("text/markdown", "") for o in outputs)
  printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "traces revised" in printed and "--- revised ---" in printed


def test_quick_demo_runs_every_stage(quick_demo_notebook, capsys):
  out, _ = quick_demo_notebook
  for path in ("task/train.jsonl", "generate/traces.jsonl", "search/revised.jsonl", "sft/revised/export/config.json",
               "sft/control/export/model.safetensors", "eval/base/summary.json", "eval/revised/summary.json",
               "report.md", "search/report.html", "demo_summary.json", "comparison.md", "comparison_accuracy_vs_length.png"):
    assert os.path.exists(os.path.join(out, path)), path
  with open(os.path.join(out, "demo_summary.json")) as f:
    summary = json.load(f)
  assert set(summary["models"]) == {"base", "control", "revised"}
  assert summary["search"]["traces"] > 0 and summary["search"]["correct_after"] == 1.0
  searched = [json.loads(line) for line in open(os.path.join(out, "search", "revised.jsonl"))]
  assert len(searched) == demo.DemoConfig.quick(out).num_train_problems
  # A second run finds every stage done and redoes nothing.
  before = {p: os.path.getmtime(os.path.join(out, p)) for p in ("search/revised.jsonl", "eval/base/summary.json")}
  assert retro_jax.cli.main(["demo", "--quick", "--output", out]) == 0
  assert before == {p: os.path.getmtime(os.path.join(out, p)) for p in before}
  # A run with other settings refuses the folder instead of reporting these stages as its own.
  capsys.readouterr()
  assert retro_jax.cli.main(["demo", "--quick", "--seed", "1", "--output", out]) == 2
  assert "seed: 0 there, 1 now" in capsys.readouterr().err
  assert before == {p: os.path.getmtime(os.path.join(out, p)) for p in before}
