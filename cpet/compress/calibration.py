"""Task-agnostic calibration data and activation statistics read with forward hooks.

Calibration text (Wanda, activation-scored structured pruning, MoE routers) is generic instruction
text, not a task's data: the Alpaca subset in the data folder by default, or any UTF-8 text file.
It is tokenized, concatenated and cut into full ``(n, seq_len)`` windows (no padding, as Wanda does
with C4), so every recorded token is a real one.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from cpet.errors import CpetError
from cpet.io import resolve_data_dir


@dataclass(frozen=True)
class Calibration:
    """``input_ids`` windows (n, seq_len) and the batch size to run them with."""

    input_ids: torch.Tensor
    batch_size: int = 8

    def batches(self) -> Iterator[dict]:
        for s in range(0, len(self.input_ids), self.batch_size):
            ids = self.input_ids[s: s + self.batch_size]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def calibration_texts(source: str = "alpaca", data_dir: str | None = None) -> list[str]:
    """Texts from ``alpaca`` (data folder, else the hub) or from a text file path (one passage per line)."""
    p = Path(source)
    if p.is_file():
        return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if source != "alpaca":
        raise CpetError(f"calibration source {source!r} is neither 'alpaca' nor an existing text file")
    root = resolve_data_dir(data_dir)
    if root is not None and (root / "alpaca" / "alpaca_data_1k.json").is_file():
        rows = json.loads((root / "alpaca" / "alpaca_data_1k.json").read_text(encoding="utf-8"))
    else:
        try:
            import datasets

            rows = list(datasets.load_dataset("tatsu-lab/alpaca", split="train").select(range(1000)))
        except Exception as e:  # noqa: BLE001
            raise CpetError("no calibration text: put alpaca/alpaca_data_1k.json under the data folder "
                            f"($CPET_DATA), or pass a text file as calibration source ({e})") from None
    return [" ".join(x for x in (r["instruction"], r.get("input", ""), r["output"]) if x) for r in rows]


def make_calibration(tokenizer, samples: int = 64, seq_len: int = 128, source: str = "alpaca",
                     data_dir: str | None = None, batch_size: int = 8) -> Calibration:
    texts = calibration_texts(source, data_dir)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(ids) >= samples * seq_len:
            break
    n = min(samples, len(ids) // seq_len)
    if n < 1:
        raise CpetError(f"calibration text too short for one window of {seq_len} tokens")
    return Calibration(torch.tensor(ids[: n * seq_len]).view(n, seq_len), batch_size)


@contextmanager
def record_inputs(model: nn.Module, names: list[str], fn: Callable[[str, torch.Tensor], None]):
    """Call ``fn(name, x)`` with the input ``x`` (.., in) of each named module on every forward; hooks
    are removed on exit."""
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, args, out, name=name: fn(name, args[0].detach())))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run(model: nn.Module, calib: Calibration) -> None:
    model.eval()
    for batch in calib.batches():
        model(**batch)


@torch.no_grad()
def input_stats(model: nn.Module, names: list[str], calib: Calibration) -> dict[str, dict[str, torch.Tensor]]:
    """Per module: ``sq`` = sum of x_j^2, ``abs`` = sum of |x_j|, ``max`` = max |x_j| over calibration
    tokens, and ``n`` tokens."""
    stats: dict[str, dict[str, torch.Tensor]] = {}

    def acc(name, x):
        x = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        f = x.shape[-1]
        s = stats.setdefault(name, {"sq": torch.zeros(f), "abs": torch.zeros(f), "max": torch.zeros(f), "n": torch.zeros(())})
        s["sq"] += x.pow(2).sum(0)
        s["abs"] += x.abs().sum(0)
        s["max"] = torch.maximum(s["max"], x.abs().amax(0))
        s["n"] += x.shape[0]

    with record_inputs(model, names, acc):
        run(model, calib)
    return stats
