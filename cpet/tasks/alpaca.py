"""Alpaca instruction tuning (instruction, input, output), for decoder LMs, with the Stanford Alpaca
prompt template (the one alpaca-lora, and so the paper's LLaMA runs, used).

Locally: ../shared/data/alpaca/alpaca_data_1k.json (a 1,000-example subset; see its MANIFEST), split
seeded into ``TEST_SIZE`` test examples and the rest. Hub fallback: tatsu-lab/alpaca (train only, split
the same way). Scored by the mean log-likelihood per answer token (higher is better; perplexity =
exp(-it)); the paper's own evaluation of instruction tuning is 5-shot MMLU (``cpet.evals.mmlu``).
"""

from __future__ import annotations

from pathlib import Path

from cpet.tasks.base import Example, TaskSpec, read_json, register, seeded_split, to_examples

TEST_SIZE = 100

PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(e: Example) -> str:
    if e.text_b:
        return PROMPT_INPUT.format(instruction=e.text_a, input=e.text_b)
    return PROMPT_NO_INPUT.format(instruction=e.text_a)


def _example(r: dict) -> Example:
    return Example(r["instruction"], r.get("input") or None, 0, answers=(r["output"],))


def _alpaca_local(root: Path):
    return seeded_split(to_examples(read_json(root / "alpaca" / "alpaca_data_1k.json"), _example), TEST_SIZE)


ALPACA = register(TaskSpec(
    name="alpaca", labels=("response",), metrics=("answer_logprob",), load_local=_alpaca_local,
    hub=("tatsu-lab/alpaca", None), hub_row=_example, hub_test_split="", hub_test_size=TEST_SIZE,
    format="generate", template=alpaca_prompt, answer_prefix="",
    note=f"test = {TEST_SIZE} examples of the staged 1,000-example subset (seeded); train/val = the rest"))
