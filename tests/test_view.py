"""`retro-jax view`: the report of a real tiny-reasoner search, checked in headless Chromium's rendered DOM."""
import html.parser
import json
import os

import pytest

from retro_jax import cli as retro_cli
from retro_jax import demo
from retro_jax import jsonl
from retro_jax.search import runner
from retro_jax.tasks import arithmetic
from retro_jax.view import browser, histogram, records, report

# A trace that would run script if the page parsed record text as HTML, and would close the page's data
# element if the embedded JSON kept its "<".
HOSTILE_TRACE = ("<think>\nCompute 1 + 1 = 2 & x < y, √2 ≈ 1.414 — 中文.\n\n<script>document.title='pwned'</script>\n\n"
                 "Wait, $\\frac{a}{b}$ </script><b>bold</b>\n</think>\n\nThe answer is \\boxed{3}.")


class Node:
  def __init__(self, tag, attrs, parent):
    self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

  def text(self):
    return "".join(c if isinstance(c, str) else c.text() for c in self.children)

  def find_all(self, tag=None, cls=None, **attrs):
    found = []
    for child in self.children:
      if isinstance(child, Node):
        if ((tag is None or child.tag == tag) and (cls is None or cls in child.attrs.get("class", "").split())
            and all(child.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())):
          found.append(child)
        found += child.find_all(tag, cls, **attrs)
    return found


class DomBuilder(html.parser.HTMLParser):
  """The dumped DOM as a tree of Nodes (enough HTML for what Chromium serializes)."""
  VOID = {"meta", "input", "br", "img", "link", "hr", "rect", "line"}

  def __init__(self, text):
    super().__init__(convert_charrefs=True)
    self.root = self.current = Node("#root", {}, None)
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    node = Node(tag, attrs, self.current)
    self.current.children.append(node)
    if tag not in self.VOID:
      self.current = node

  def handle_endtag(self, tag):
    node = self.current
    while node is not self.root and node.tag != tag:
      node = node.parent
    if node is not self.root:
      self.current = node.parent

  def handle_data(self, data):
    self.current.children.append(data)


def trace_text(pre):
  """A rendered trace without its boundary markers: the record's text, as the page shows it."""
  return "".join(c if isinstance(c, str) else c.text() for c in pre.children
                 if isinstance(c, str) or "boundary" not in c.attrs.get("class", "").split())


def rendered(path, fragment=""):
  try:
    dom = browser.dump_dom(browser.file_url(path, fragment))
  except browser.BrowserMissing as error:
    pytest.fail(f"{error} (.ci/run installs it); the report is only checked in a real browser")
  root = DomBuilder(dom).root
  body = root.find_all("body")[0]
  assert body.attrs.get("data-ready") == "1", dom[-3000:]
  return root


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
  """A real search output: the tiny reasoner writes and revises traces of 12 problems; a hostile trace (wrong
  answer: skipped) and a line that is not JSON (an error record) ride along."""
  from retro_jax.engine.serving import load_text_generator
  from retro_jax.grading import Grader
  from retro_jax.search import generate
  from retro_jax.search.retro_search import SearchConfig
  from retro_jax.tokenization import load_tokenizer

  root = tmp_path_factory.mktemp("view")
  problems, _ = arithmetic.make_splits(3, 12, 0)  # seed 3: 3 of the 12 traces get revised
  arithmetic.write_problems(root / "problems.jsonl", problems)
  tokenizer = load_tokenizer(demo.DEFAULT_MODEL)
  generator = load_text_generator(demo.DEFAULT_MODEL, max_concurrent_decodes=8, max_seq_len=512, progress=False)
  with Grader(num_workers=1) as grader:
    rows, total = runner.open_input(str(root / "problems.jsonl"))
    generate.run_generate(rows, generator=generator, render_prompt=tokenizer.render_prompt, grader=grader,
                          output_path=str(root / "traces.jsonl"), total=total, progress=False,
                          config=generate.GenerateConfig(num_samples=1, max_new_tokens=320, seed=0))
    with open(root / "traces.jsonl", "a", encoding="utf-8") as file:
      file.write(json.dumps({"id": "hostile</script>", "question": "What is <b>1 + 1</b>?", "answer": "2",
                             "trace": HOSTILE_TRACE}) + "\n")
      file.write("{not json\n")
    rows, total = runner.open_input(str(root / "traces.jsonl"))
    runner.run_search(rows, generator=generator, render_prompt=tokenizer.render_prompt, grader=grader,
                      output_path=str(root / "search.jsonl"), total=total, progress=False,
                      config=SearchConfig(max_rollout_tokens=320))
  output = list(jsonl.read_jsonl(str(root / "search.jsonl")))
  page = str(root / "report.html")
  assert retro_cli.main(["view", str(root / "search.jsonl"), "--output", page]) == 0
  return root, output, page


@pytest.fixture(scope="module")
def full_view(searched):
  """The whole report on one page, as Chromium renders it."""
  return rendered(searched[2], "per=100")


def test_report_in_chromium_counts_boundaries_and_escaping(searched, full_view):
  output = searched[1]
  statuses = {status: sum(r["status"] == status for r in output) for status in {r["status"] for r in output}}
  assert statuses.get("revised", 0) >= 1 and statuses["skipped_incorrect"] == 1 and statuses["error"] == 1
  dom = full_view
  assert dom.find_all("title")[0].text().startswith("Retro-Search report")  # the hostile trace ran nothing
  buttons = {b.attrs["data-status"]: int(b.find_all("b")[0].text()) for b in dom.find_all("button", "status-count")}
  assert buttons == statuses
  articles = dom.find_all("article")
  assert [a.attrs["data-id"] for a in articles] == [str(r["id"]) for r in output]
  by_id = {str(r["id"]): r for r in output}
  for article in articles:
    record = by_id[article.attrs["data-id"]]
    assert article.attrs["data-status"] == record["status"]
    accepted = record.get("accepted_boundaries") or []
    panes = {pane.attrs["class"].split()[1]: pane for pane in article.find_all("div", "pane")}
    if record["status"] != "revised":
      assert not article.find_all(cls="accepted") and set(panes) <= {"original"}
      continue
    cut = panes["original"].find_all("span", "accepted")
    assert [int(m.attrs["data-step"]) for m in cut] == accepted[:1]
    assert [int(m.attrs["data-step"]) for m in panes["revised"].find_all("span", "accepted")] == accepted
    # The original from the cut on is greyed out; the revision from there on is new text.
    removed = "".join(s.text() for s in panes["original"].find_all("span", "removed"))
    new = "".join(s.text() for s in panes["revised"].find_all("span", "new"))
    kept = record["trace"][:len(record["trace"]) - len(removed)]
    assert kept + removed == record["trace"] and kept + new == record["revised_trace"]
    assert len(removed) > len(new) > 0
  # Every thought boundary the search's segmentation finds in an unchanged trace is marked.
  unchanged = [a for a in articles if a.attrs["data-status"] == "unchanged"]
  assert sum(len(a.find_all("span", "boundary")) for a in unchanged) == sum(
      by_id[a.attrs["data-id"]]["thoughts_before"] - 1 for a in unchanged)
  hostile = dom.find_all("article", data_id="hostile</script>")[0]
  shown = trace_text(hostile.find_all("pre")[0])
  assert shown == HOSTILE_TRACE and "<script>document.title='pwned'</script>" in shown
  assert not hostile.find_all("script")
  assert [b.text() for b in hostile.find_all("b")] == ["question ", "gold "]  # "<b>" in text stays text
  assert len(dom.find_all("script")) == 4  # config, index, one chunk, the page's own script: none injected


def test_filter_search_sort_and_permalink_in_chromium(searched):
  _, output, page = searched
  revised = sorted((r for r in output if r["status"] == "revised"), key=lambda r: r["tokens_after"] - r["tokens_before"])
  dom = rendered(page, "status=revised&sort=tokens_saved")
  assert [a.attrs["data-id"] for a in dom.find_all("article")] == [r["id"] for r in revised]
  assert dom.find_all("body")[0].attrs["data-matching"] == str(len(revised))
  # The same view reached by clicking: the header's "revised" count, then the sort menu.
  clicking = page.replace(".html", "_clicks.html")
  with open(page, encoding="utf-8") as source, open(clicking, "w", encoding="utf-8") as target:
    target.write(source.read().replace("</body>", """<script>
      document.querySelector('button.status-count[data-status="revised"]').click();
      const sort = document.getElementById("sort");
      sort.value = "tokens_saved";
      sort.dispatchEvent(new Event("change"));
    </script></body>"""))
  dom = rendered(clicking)
  assert [a.attrs["data-id"] for a in dom.find_all("article")] == [r["id"] for r in revised]
  dom = rendered(page, "status=unchanged,error&per=3&page=2")
  expected = [str(r["id"]) for r in output if r["status"] in ("unchanged", "error")][3:6]
  assert [a.attrs["data-id"] for a in dom.find_all("article")] == expected
  dom = rendered(page, "q=<B>1 + 1")  # search is case-insensitive over id, question and answer
  assert [a.attrs["data-id"] for a in dom.find_all("article")] == ["hostile</script>"]
  dom = rendered(page, "q=DOUBLE-check&in=traces&per=100")  # ... and, asked to, over the traces
  with_phrase = [str(r["id"]) for r in output if "double-check" in r.get("trace", "").lower()]
  assert with_phrase and [a.attrs["data-id"] for a in dom.find_all("article")] == with_phrase
  target = output[1]["id"]
  dom = rendered(page, f"record={target}")
  articles = dom.find_all("article")
  assert [a.attrs["data-id"] for a in articles] == [target]
  assert articles[0].find_all("a", "permalink")[0].attrs["href"] == "#record=" + target.replace("#", "%23")


def test_records_out_of_line_load_the_same_in_chromium(searched, full_view, tmp_path):
  root, _, page = searched
  split = str(tmp_path / "split.html")
  summary = report.build_report(str(root / "search.jsonl"), split, max_inline_bytes=0)
  assert summary.data_dir and os.listdir(summary.data_dir) == ["chunk-000000.js"]
  assert os.path.getsize(split) < os.path.getsize(page)
  inline_ids = [a.attrs["data-id"] for a in full_view.find_all("article")]
  split_dom = rendered(split, "per=100")
  assert [a.attrs["data-id"] for a in split_dom.find_all("article")] == inline_ids
  assert split_dom.find_all("span", "accepted")


def test_tree_output_and_kept_rollouts_render_in_chromium(tmp_path):
  nodes = [{"id": 0, "parent": None, "type": "base", "text": "What is 2 + 3 * 4?", "visits": 4, "total_reward": 3,
            "depth": 0},
           {"id": 1, "parent": 0, "type": "sub_task", "text": "Firstly, multiply.", "visits": 3, "total_reward": 3,
            "depth": 1},
           {"id": 2, "parent": 0, "type": "sub_task", "text": "Firstly, add <script>.", "visits": 1,
            "total_reward": 0, "depth": 1},
           {"id": 3, "parent": 1, "type": "answer", "text": "The answer is: \\boxed{14}", "visits": 3,
            "total_reward": 3, "depth": 2, "correct": True},
           {"id": 4, "parent": 2, "type": "thinking", "text": "long " * 40, "visits": 1, "total_reward": 0,
            "depth": 2}]
  tree = {"id": "t1", "question": "What is 2 + 3 * 4?", "answer": "14", "rollouts": 4, "status": "solved",
          "nodes": nodes}
  kept = {"id": "s1", "question": "q", "answer": "2", "status": "unchanged", "accepted_boundaries": [],
          "trace": "<think>\nA\n\nWait, B\n</think>\n\n\\boxed{2}", "rollouts": [
              {"boundary": 1, "text": "C </think> \\boxed{3}", "tokens": 7, "correct": False},
              {"boundary": 1, "text": "D <i>", "tokens": 4, "correct": True}]}
  path = tmp_path / "trees.jsonl"
  path.write_text(json.dumps(tree) + "\n" + json.dumps(kept) + "\n")
  summary = report.build_report(str(path), str(tmp_path / "trees.html"))
  assert summary.statuses == {"solved": 1, "unchanged": 1}
  dom = rendered(str(tmp_path / "trees.html"))
  items = dom.find_all("article", data_id="s1")[0].find_all("li")
  assert [[b.text() for b in li.find_all("span", "badge")] for li in items] == [
      ["boundary: 1", "tokens: 7", "correct: false"], ["boundary: 1", "tokens: 4", "correct: true"]]
  assert [li.find_all("pre")[0].text() for li in items] == ["C </think> \\boxed{3}", "D <i>"]
  article = dom.find_all("article")[0]
  assert article.attrs["data-kind"] == "tree"
  outline = {int(d.attrs["data-node"]): d for d in article.find_all("details", "node")}
  assert sorted(outline) == [0, 1, 2, 3, 4]
  assert outline[3].parent is outline[1] and outline[1].parent is outline[0] and outline[2].parent is outline[0]
  assert outline[4].parent is outline[2] and outline[4].find_all("pre")[0].text() == "long " * 40
  assert [b.text() for b in outline[3].find_all("span", "badge")] == ["visits 3", "reward 3 (mean 1.00)", "correct"]
  assert dom.find_all("title")[0].text() == "Tree-CoT report: trees.jsonl"
  badges = [b.text() for b in outline[1].find_all("summary")[0].find_all("span", "badge")]
  assert badges == ["visits 3", "reward 3 (mean 1.00)"]
  assert "Firstly, add <script>." in outline[2].text()


def test_segmentation_of_a_revised_record_and_savings():
  original = "<think>\nA\n\nWait, B\n\nC\n</think>\n\nx"
  revised = "<think>\nA\n\nD\n</think>\n\nx"
  record = {"id": 1, "status": "revised", "trace": original, "revised_trace": revised, "accepted_boundaries": [1],
            "tokens_before": 10, "tokens_after": 6, "steps_before": 3, "steps_after": 2}
  detail = records.search_detail(record, ("Wait",))
  assert detail["original"] == {"head": "<think>\n", "steps": ["A", "Wait, B", "C\n"], "solution": "</think>\n\nx",
                                "bounds": [1]}
  assert detail["revised"] == {"keep": 1, "steps": ["D\n"], "solution": "</think>\n\nx", "bounds": []}
  stats = records.RunStatistics()
  for i, entry in enumerate([record, {**record, "id": 2, "status": "unchanged", "tokens_after": 10, "steps_after": 3}]):
    stats.add(records.index_entry(i, i, entry, "search", 0))
  rows = {row["label"]: (row["records"], row["mean"], row["median"]) for row in stats.savings()}
  assert rows == {"tokens saved, all searched": (2, 2.0, 2.0), "steps saved, all searched": (2, 0.5, 0.5),
                  "tokens saved, revised": (1, 4.0, 4), "steps saved, revised": (1, 1.0, 1)}
  assert histogram.bin_counts([0, 1, 4.9, 5, 9, 12], low=0, width=5, bins=2) == [3, 3]  # the top bin takes the rest


def test_cli_bad_input(tmp_path, capsys):
  assert retro_cli.main(["view", str(tmp_path / "missing.jsonl")]) == 2
  assert capsys.readouterr().err.strip() == f"retro-jax view: no such file: {tmp_path / 'missing.jsonl'}"
  (tmp_path / "blocker").write_text("a file where the output folder should be")
  (tmp_path / "one.jsonl").write_text('{"id": "a", "status": "error", "reason": "empty trace"}\n')
  assert retro_cli.main(["view", str(tmp_path / "one.jsonl"), "--output", str(tmp_path / "blocker" / "r.html")]) == 2
  assert capsys.readouterr().err.startswith(f"retro-jax view: cannot write {tmp_path / 'blocker' / 'r.html'}: ")
  (tmp_path / "empty.jsonl").write_text("\n")
  assert retro_cli.main(["view", str(tmp_path / "empty.jsonl")]) == 2
  assert "holds no records" in capsys.readouterr().err
  (tmp_path / "mixed.jsonl").write_text('{"id": "a", "status": "error", "reason": "empty trace"}\n[oops\n')
  assert retro_cli.main(["view", str(tmp_path / "mixed.jsonl")]) == 0
  captured = capsys.readouterr()
  assert "2 records (1 error, 1 unreadable)" in captured.out and "1 line(s)" in captured.err
  assert os.path.exists(tmp_path / "mixed.html")
