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

from cpet.formats import MODEL_KEYS
from cpet.models import TaskOutput


class Teacher:
    """Frozen teacher with a per-row output cache (keyed by the row's ``index`` in its training split).

    Only what the distillation uses is kept: the last hidden states over the real positions, and the
    head's per-row output when ``"logits"`` is distilled.
    """

    def __init__(self, model: nn.Module, cache: bool = True, outputs: tuple[str, ...] = ("hidden",)):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cache, self.outputs = cache, tuple(outputs)
        self._hidden: dict[int, torch.Tensor] = {}  # row index -> (T_i, H), real positions only
        self._scores: dict[int, torch.Tensor] = {}  # row index -> the head's output for that row

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Teacher (hidden (N, T, H), head scores (N, ...)) for the batch's rows, padded like the student's."""
        index = batch["index"].tolist()
        todo = [row for row, i in enumerate(index) if not (self.cache and i in self._hidden)]
        fresh_h, fresh_z = {}, {}
        if todo:
            rows = torch.tensor(todo)
            inputs = {k: batch[k][rows] for k in MODEL_KEYS if k in batch}
            out: TaskOutput = self.model(**inputs)
            lengths = out.mask.sum(1).tolist()  # right padding: real positions are a prefix
            for j, r in enumerate(todo):
                fresh_h[index[r]] = out.hidden[j, : int(lengths[j])].clone()
                if "logits" in self.outputs:
                    fresh_z[index[r]] = out.scores[j].clone()
            if self.cache:
                self._hidden.update(fresh_h)
                self._scores.update(fresh_z)
        store_h = self._hidden if self.cache else fresh_h
        store_z = self._scores if self.cache else fresh_z
        first = store_h[index[0]]
        T = max(store_h[i].shape[0] for i in index)
        hidden = first.new_zeros(len(index), T, first.shape[-1])
        for row, i in enumerate(index):
            h = store_h[i]
            hidden[row, : h.shape[0]] = h
        scores = torch.stack([store_z[i] for i in index]) if "logits" in self.outputs else None
        return hidden, scores


def distill_loss(teacher: tuple[torch.Tensor, torch.Tensor | None], student: TaskOutput,
                 outputs: tuple[str, ...]) -> torch.Tensor:
    """MSE between teacher and student on the chosen outputs (hidden: the student's real positions only)."""
    t_hidden, t_scores = teacher
    loss = student.hidden.new_zeros(())
    if "hidden" in outputs:
        m = student.mask.bool()
        T = m.shape[1]
        t_hidden = t_hidden.to(student.hidden)
        if t_hidden.shape[1] < T:  # the teacher's rows were cut at their real length
            t_hidden = F.pad(t_hidden, (0, 0, 0, T - t_hidden.shape[1]))
        loss = loss + F.mse_loss(student.hidden[m], t_hidden[:, :T][m])
    if "logits" in outputs:
        loss = loss + F.mse_loss(student.scores, t_scores.to(student.scores))
    return loss
