"""Distillation for knowledge recovery (CPET eq. 4-5).

    loss = task_loss + alpha * [ MSE(h_teacher, h_student) over real tokens  and/or  MSE(z_teacher, z_student) ]

The teacher is the uncompressed backbone with its own trained PET module and head, frozen, in eval
mode, run under ``torch.no_grad()``. Being frozen and deterministic, its outputs are cached per
training example the first time they are needed, so later epochs cost no teacher forward at all.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpet.models import TaskOutput


class Teacher:
    """Frozen teacher with a per-example output cache (keyed by the example's index in the train set)."""

    def __init__(self, model: nn.Module, cache: bool = True):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cache = cache
        self._hidden: dict[int, torch.Tensor] = {}  # index -> (T_i, H)
        self._logits: dict[int, torch.Tensor] = {}  # row index -> the head's output for that row

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (hidden (N, T, H), head scores (N, out)) for the batch's rows, padded like the batch."""
        index = batch["index"].tolist()
        lengths = batch["attention_mask"].sum(1).tolist()
        todo = [row for row, i in enumerate(index) if not (self.cache and i in self._hidden)]
        fresh_h, fresh_z = {}, {}
        if todo:
            rows = torch.tensor(todo)
            t = int(max(lengths[r] for r in todo))
            inputs = {k: batch[k][rows, :t] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            out: TaskOutput = self.model(**inputs)
            for j, r in enumerate(todo):
                fresh_h[index[r]] = out.hidden[j, : int(lengths[r])].clone()
                fresh_z[index[r]] = out.scores[j].clone()
            if self.cache:
                self._hidden.update(fresh_h)
                self._logits.update(fresh_z)
        store_h = self._hidden if self.cache else fresh_h
        store_z = self._logits if self.cache else fresh_z
        B, T = batch["input_ids"].shape
        H = next(iter(store_h.values())).shape[-1]
        hidden = torch.zeros(B, T, H)
        for row, i in enumerate(index):
            h = store_h[i]
            hidden[row, : h.shape[0]] = h
        logits = torch.stack([store_z[i] for i in index])
        return hidden, logits


def distill_loss(teacher: tuple[torch.Tensor, torch.Tensor], student: TaskOutput, mask: torch.Tensor,
                 outputs: tuple[str, ...]) -> torch.Tensor:
    """MSE between teacher and student on the chosen outputs (hidden: real tokens only)."""
    t_hidden, t_logits = teacher
    loss = student.logits.new_zeros(())
    if "hidden" in outputs:
        m = mask.bool()
        loss = loss + F.mse_loss(student.hidden[m], t_hidden.to(student.hidden)[m])
    if "logits" in outputs:
        loss = loss + F.mse_loss(student.scores, t_logits.to(student.scores))
    return loss
