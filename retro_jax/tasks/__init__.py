"""The synthetic reasoning task behind the bundled tiny reasoner: problems, R1-style traces, tokenizer."""
