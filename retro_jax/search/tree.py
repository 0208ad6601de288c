"""Tree-CoT construction for one problem: MCTS over typed thoughts (arXiv 2503.01461), as a small state machine.

A node is one typed thought (`sub_task`, `thinking`, `hypothesis`, `reflection`, `double_check`,
`thinking_from_scratch`, `answer`). The model writes it from the path so far plus the type's opening text and a
prefill phrase drawn from that type's list, and stops at the type's closing text. An action tree says which
children each type gets; a rollout descends from the root (expanding a node the first time it is reached, then
choosing children by UCT), is rewarded 1 when it ends in an answer node the grader finds correct, and backs the
reward up its path. A wrong answer adds a `reflection` child under the nearest `double_check` ancestor, so a later
rollout can reflect and redo.

`TreeSearch` never calls the model: like `RecordSearch` it hands out one `GenerationRequest` at a time and takes
the result back, so `tree_runner.py` can keep an engine's decode slots full with nodes of many trees. Every prompt
is a nested prefix of its subtree's prompts, which is what the engine's prefix cache reuses.

Resolved details the paper leaves open:
- Expansion asks for all children of one type and one prefill phrase as one n-sample request; children of other
  types (other prompts) follow as further requests before the rollout goes on. Child order is the action tree's
  type order, then draw order; "unvisited children first" takes the first unvisited child in that order.
- A child is closed when its text contains the closing text (cut just after it); a type with no closing text
  (an answer written to the end of sequence) is closed when generation ended on EOS. A non-answer child that did
  not close (token cap, EOS mid-thought, a prompt that no longer fits) is a dead end: a rollout that reaches it
  ends there with reward 0, like one that reaches the depth limit or a type with no children. `ended` counts
  those rollouts, so every non-answer node has visits = sum(children's visits) + ended.
- An answer node is graded once, when written; a rollout that reaches it again gets the same reward.
- Backtracking adds at most one reflection child per double_check node: a fixed reflection text would
  otherwise repeat the same node under the same parent.
- Randomness (prefill draws, UCT ties) comes from one generator seeded from (run seed, record id); a request's
  seed from (run seed, record id, request number). The tree is a function of the record, never of the batch.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import random
from typing import Mapping, Sequence

from retro_jax.engine.requests import Completion, GenerationRequest, GenerationResult, SamplingParams
from retro_jax.search.retro_search import Encode, GradeMany, derive_seed

ROOT = "base"
ANSWER = "answer"
REFLECTION = "reflection"
DOUBLE_CHECK = "double_check"
NODE_TYPES = ("sub_task", "thinking", "hypothesis", REFLECTION, DOUBLE_CHECK, "thinking_from_scratch", ANSWER)

# The paper's default action tree: node type -> {child type: number of children}.
PAPER_ACTION_TREE = {
    ROOT: {"sub_task": 2},
    "sub_task": {"thinking": 2},
    "hypothesis": {"thinking": 2},
    "thinking": {DOUBLE_CHECK: 2, "thinking": 2},
    DOUBLE_CHECK: {ANSWER: 1},
    REFLECTION: {"thinking_from_scratch": 2},
    "thinking_from_scratch": {"thinking": 2},
    ANSWER: {},
}


@dataclasses.dataclass(frozen=True)
class ThoughtStyle:
  """How a node of one type reads: `open` + a prefill phrase + the model's text up to `close` (included).
  `fixed_text`, when set, is the whole node (no model call), as the paper allows for reflections."""

  open: str
  close: str
  prefills: tuple[str, ...] = ("",)
  fixed_text: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "prefills", tuple(self.prefills))
    if not self.prefills:
      raise ValueError("a thought style needs at least one prefill phrase (\"\" for none)")


def _tagged(kind: str, *prefills: str) -> ThoughtStyle:
  return ThoughtStyle(f"<{kind}>\n", f"</{kind}>\n", prefills)


# Tagged thoughts with prefill phrases in the spirit of the paper's lists.
PAPER_STYLES = {
    "sub_task": _tagged("sub_task", "Firstly, I need to break down this task.", "Let me split the problem into steps."),
    "thinking": _tagged("thinking", "Let me work through this.", "Next,"),
    "hypothesis": _tagged("hypothesis", "Maybe", "Alternatively"),
    REFLECTION: ThoughtStyle("<reflection>\n", "</reflection>\n", fixed_text=(
        "<reflection>\nWait, the result does not hold up. I should rethink this from scratch.\n</reflection>\n")),
    DOUBLE_CHECK: _tagged(DOUBLE_CHECK, "Let's check the result", "Let me verify this step by step."),
    "thinking_from_scratch": _tagged("thinking_from_scratch", "Let me start over.", "Let me try a different way."),
    ANSWER: _tagged(ANSWER, "The answer is:"),
}


@dataclasses.dataclass(frozen=True)
class TreeConfig:
  """Every option of the method with the paper's default; `max_prompt_tokens=0` means no limit."""

  action_tree: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=lambda: PAPER_ACTION_TREE)
  styles: Mapping[str, ThoughtStyle] = dataclasses.field(default_factory=lambda: PAPER_STYLES)
  max_depth: int = 16  # nodes below the root on the longest path
  max_rollouts: int = 32
  thresholds: tuple[float, float] = (4.0, 8.0)
  exploration: float = 1.414  # c of UCT
  max_node_tokens: int = 1024
  temperature: float = 0.6
  top_p: float = 0.95
  top_k: int = 0
  max_prompt_tokens: int = 0
  second_model_types: tuple[str, ...] = ()  # node types a second model writes ("multi-model collaboration")
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "thresholds", tuple(self.thresholds))
    object.__setattr__(self, "second_model_types", tuple(self.second_model_types))
    unknown = set(self.second_model_types) - set(self.styles)
    if unknown:
      raise ValueError(f"second_model_types: {sorted(unknown)} have no thought style")
    if ROOT not in self.action_tree:
      raise ValueError(f"the action tree needs a {ROOT!r} entry")
    for parent, children in self.action_tree.items():
      for child, count in children.items():
        if child not in self.styles:
          raise ValueError(f"action tree: {parent} -> {child}, but {child!r} has no thought style")
        if count < 1:
          raise ValueError(f"action tree: {parent} -> {child} asks for {count} children")
    if len(self.thresholds) != 2 or not 0 < self.thresholds[0] <= self.thresholds[1]:
      raise ValueError(f"thresholds must be two numbers 0 < t0 <= t1, got {self.thresholds}")
    for name in ("max_depth", "max_rollouts", "max_node_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  @property
  def sampling(self) -> SamplingParams:
    return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


@dataclasses.dataclass
class Node:
  id: int
  parent: int | None
  type: str
  text: str
  depth: int
  closed: bool = True  # False: a dead end (see the module docstring)
  correct: bool | None = None  # answer nodes: the grader's verdict
  visits: int = 0
  total_reward: float = 0.0
  ended: int = 0  # rollouts that ended here without an answer
  children: list[int] = dataclasses.field(default_factory=list)
  expanded: bool = False

  def to_json(self) -> dict:
    return {"id": self.id, "parent": self.parent, "type": self.type, "text": self.text, "visits": self.visits,
            "total_reward": self.total_reward, "depth": self.depth, "closed": self.closed, "correct": self.correct,
            "ended": self.ended}


@dataclasses.dataclass(frozen=True)
class TreeProblem:
  id: str | int
  question: str
  answer: str
  prompt_text: str  # the rendered question, ending where the thinking starts ("...<think>\n")


@dataclasses.dataclass(frozen=True)
class TreeContext:
  """What every tree of a run shares: the config, the tokenizer and the grader.

  With a second model, its tokenizer encodes the prompts of `config.second_model_types`, and each such request
  is counted in `second_model_requests` (by content: the driver renumbers request ids) so that
  `tree_runner.TwoModelGenerator` can send it to that model.
  """

  config: TreeConfig
  encode: Encode
  grade_many: GradeMany
  second_encode: Encode | None = None
  second_model_requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass(frozen=True)
class _ChildGroup:
  """Children of one parent, type and prefill phrase: one request (or none, for a fixed text)."""

  parent: int
  type: str
  prefill: str
  count: int


def uct_score(total_reward: float, visits: int, parent_visits: int, exploration: float) -> float:
  return total_reward / visits + exploration * math.sqrt(2.0 * math.log(parent_visits) / visits)


def path_ids(nodes: Sequence[Node] | Sequence[dict], node_id: int) -> list[int]:
  """Ids from the root to `node_id` (works on Nodes and on their JSON form)."""
  ids = []
  current: int | None = node_id
  while current is not None:
    ids.append(current)
    node = nodes[current]
    current = node.parent if isinstance(node, Node) else node["parent"]
  return ids[::-1]


class TreeSearch:
  """The tree of one problem: call `next_request()`, then `on_result()` with its result, until the former returns
  None; then `outputs()` holds the output record."""

  def __init__(self, context: TreeContext, problem: TreeProblem):
    self._context = context
    self._config = context.config
    self._problem = problem
    self._rng = random.Random(derive_seed(self._config.seed, problem.id, "tree"))
    self.nodes = [Node(0, None, ROOT, "", 0)]
    self.rollouts = 0
    self.status: str | None = None
    self._path: list[int] = [0]  # the rollout being descended
    self._pending: collections.deque[_ChildGroup] = collections.deque()
    self._request: GenerationRequest | None = None
    self.requests = 0
    self.tokens_generated = 0
    self.prompt_tokens = 0
    self.prompt_tokens_computed = 0

  # ---- driving ----

  def next_request(self) -> GenerationRequest | None:
    """The next children to write, or None once the tree is finished."""
    while self._request is None and self.status is None:
      if self._pending:
        group = self._pending[0]
        fixed = self._config.styles[group.type].fixed_text
        if fixed is None:
          self._request = self._group_request(group)
        else:
          self._pending.popleft()
          for _ in range(group.count):
            self._add_child(group.parent, group.type, fixed, closed=True)
      else:
        self._descend()
    return self._request

  def on_result(self, result: GenerationResult) -> None:
    if self._request is None:
      raise RuntimeError(f"tree {self._problem.id!r}: a result arrived with no request out")
    self._request = None
    group = self._pending.popleft()
    self.tokens_generated += sum(len(sample.tokens) for sample in result.samples)
    self.prompt_tokens += len(result.request.prompt_tokens)
    self.prompt_tokens_computed += result.prompt_tokens_computed
    style = self._config.styles[group.type]
    written = [(style.open + group.prefill + text, closed)
               for text, closed in (_close(sample, style.close) for sample in result.samples)]
    grades = [None] * len(written)
    if group.type == ANSWER:
      grades = [g.correct for g in self._context.grade_many([(self._problem.answer, t) for t, _ in written])]
    for (text, closed), correct in zip(written, grades):
      self._add_child(group.parent, group.type, text, closed, correct)

  @property
  def done(self) -> bool:
    return self.status is not None

  def outputs(self) -> list[dict]:
    if not self.done:
      raise RuntimeError(f"tree {self._problem.id!r} is still being built")
    return [{
        "id": self._problem.id, "question": self._problem.question, "answer": self._problem.answer,
        "rollouts": self.rollouts, "status": self.status, "nodes": [node.to_json() for node in self.nodes],
        "requests": self.requests, "tokens_generated": self.tokens_generated,
        "prompt_tokens": self.prompt_tokens, "prompt_tokens_computed": self.prompt_tokens_computed,
    }]

  # ---- the rollout ----

  def _terminal(self, node: Node) -> bool:
    return (node.type == ANSWER or not node.closed or node.depth >= self._config.max_depth
            or not self._config.action_tree.get(node.type))

  def _descend(self) -> None:
    """Goes down from the end of the current path until a node needs children written (queued in `_pending`)
    or the rollout ends (rewarded and backed up)."""
    node = self.nodes[self._path[-1]]
    while not self._terminal(node):
      if not node.expanded:
        node.expanded = True
        self._pending.extend(self._expansion(node))
        return
      node = self.nodes[self._select_child(node)]
      self._path.append(node.id)
    self._finish_rollout(node)

  def _expansion(self, node: Node) -> list[_ChildGroup]:
    groups = []
    for child_type, count in self._config.action_tree[node.type].items():
      prefills = collections.Counter(self._rng.choice(self._config.styles[child_type].prefills) for _ in range(count))
      groups += [_ChildGroup(node.id, child_type, prefill, n) for prefill, n in prefills.items()]
    return groups

  def _select_child(self, node: Node) -> int:
    """The first unvisited child, else the UCT maximum (ties broken by the tree's generator)."""
    children = [self.nodes[i] for i in node.children]
    for child in children:
      if child.visits == 0:
        return child.id
    scores = [uct_score(c.total_reward, c.visits, node.visits, self._config.exploration) for c in children]
    best = max(scores)
    return self._rng.choice([c.id for c, s in zip(children, scores) if s == best])

  def _finish_rollout(self, leaf: Node) -> None:
    reward = 1.0 if leaf.type == ANSWER and leaf.correct else 0.0
    if leaf.type != ANSWER:
      leaf.ended += 1
    for node_id in self._path:
      self.nodes[node_id].visits += 1
      self.nodes[node_id].total_reward += reward
    if leaf.type == ANSWER and not leaf.correct:
      self._backtrack()
    self.rollouts += 1
    self._path = [0]
    self.status = self._stop_status()

  def _backtrack(self) -> None:
    """A reflection child under the nearest double_check ancestor of the wrong answer, once per such node."""
    for node_id in reversed(self._path[:-1]):
      node = self.nodes[node_id]
      if node.type == DOUBLE_CHECK:
        if REFLECTION in self._config.styles and not any(self.nodes[c].type == REFLECTION for c in node.children):
          self._pending.append(_ChildGroup(node.id, REFLECTION, self._rng.choice(
              self._config.styles[REFLECTION].prefills), 1))
        return

  def _stop_status(self) -> str | None:
    rollouts, reward = self.rollouts, self.nodes[0].total_reward
    low, high = self._config.thresholds
    if reward >= high or (rollouts > self._config.max_rollouts and reward >= low):
      return "success"
    if rollouts > 4 * self._config.max_rollouts:
      return "failure"
    return None

  # ---- writing nodes ----

  def path_text(self, node_id: int) -> str:
    return "".join(self.nodes[i].text for i in path_ids(self.nodes, node_id))

  def _group_request(self, group: _ChildGroup) -> GenerationRequest:
    style = self._config.styles[group.type]
    prompt = self._problem.prompt_text + self.path_text(group.parent) + style.open + group.prefill
    second = group.type in self._config.second_model_types
    encode = self._context.second_encode if second else self._context.encode
    self.requests += 1
    request = GenerationRequest(
        prompt_tokens=tuple(encode(prompt)),
        max_new_tokens=self._config.max_node_tokens,
        sampling=self._config.sampling,
        seed=derive_seed(self._config.seed, self._problem.id, f"request-{self.requests}"),
        n=group.count,
        stop_strings=(style.close,) if style.close else (),
    )
    if second:
      self._context.second_model_requests[request] += 1
    return request

  def _add_child(self, parent_id: int, node_type: str, text: str, closed: bool, correct: bool | None = None) -> None:
    parent = self.nodes[parent_id]
    node = Node(len(self.nodes), parent_id, node_type, text, parent.depth + 1, closed, correct)
    self.nodes.append(node)
    parent.children.append(node.id)


def _close(sample: Completion, close: str) -> tuple[str, bool]:
  """The generated text cut just after the closing text, and whether it closed (see the module docstring)."""
  if not close:
    return sample.text, sample.finish_reason == "eos"
  at = sample.text.find(close)
  if at < 0:
    return sample.text, False
  return sample.text[:at + len(close)], True
