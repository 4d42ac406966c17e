"""Benchmarks for whole language models (not per-task tuning), e.g. 5-shot MMLU."""
