"""Retro-Search (Lu et al., 2025; specified in search/README.md): revise reasoning traces at their thought switches.

- `traces`: steps, thoughts and boundaries of a trace (lossless; `<think>` and `<|begin_of_thought|>` styles);
- `retro_search`: the search of one record as a state machine (`SearchConfig`, `RecordSearch`);
- `runner`: many records over one engine, resumable JSONL in and out, the run summary;
- `generate`: sample and grade traces, the input of the search;
- `cli`: `retro-jax search` and `retro-jax generate`;
- `tree`, `tree_runner`, `pairs`, `tree_cli`: tree-CoT (arXiv 2503.01461): MCTS over typed thoughts per problem,
  many trees over one engine, SFT records and DPO pairs mined from the trees, `retro-jax tree` / `retro-jax pairs`.
"""
