"""Distillation for knowledge recovery (CPET eq. 4-5).

    loss = task_loss + alpha * [ MSE(h_teacher, h_student) over real tokens  (hidden: the last layer;
                                  layers: every layer's, averaged)  and/or  MSE(z_teacher, z_student) ]

The teacher is the uncompressed backbone with its own trained PET module and head, frozen, in eval
mode, run under ``torch.no_grad()``. Being frozen and deterministic, its outputs are cached per
training example the first time they are needed, so later epochs cost no teacher forward at all (and, with
a shared ``store``, neither do the other paradigms of the experiment that distill the same teacher).
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

    def __init__(self, model: nn.Module, cache: bool = True, outputs: tuple[str, ...] = ("hidden",),
                 store: dict | None = None):
        """``store``: a dict shared by the runs that distill this same teacher on the same training rows (the
        paradigms of one experiment), so the teacher runs over each row once for all of them; its key is
        the distilled outputs."""
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cache, self.outputs = cache, tuple(outputs)
        kept = (store if store is not None and cache else {}).setdefault(self.outputs, ({}, {}, {}))
        self._hidden: dict[int, torch.Tensor] = kept[0]  # row index -> (T_i, H), real positions only
        self._scores: dict[int, torch.Tensor] = kept[1]  # row index -> the head's output for that row
        self._layers: dict[int, torch.Tensor] = kept[2]  # row index -> (L, T_i, H) with "layers"

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Teacher (hidden (N, T, H), head scores (N, ...), every layer (N, L, T, H)) for the batch's rows,
        padded like the student's (scores / layers None unless distilled)."""
        index = batch["index"].tolist()
        layers = "layers" in self.outputs
        todo = [row for row, i in enumerate(index) if not (self.cache and i in self._hidden)]
        fresh_h, fresh_z, fresh_l = {}, {}, {}
        if todo:
            rows = torch.tensor(todo)
            inputs = {k: batch[k][rows] for k in MODEL_KEYS if k in batch}
            out: TaskOutput = self.model(**inputs, **({"output_layers": True} if layers else {}))
            lengths = out.mask.sum(1).tolist()  # right padding: real positions are a prefix
            stacked = torch.stack(out.layers, 1) if layers else None  # (n, L, T, H)
            for j, r in enumerate(todo):
                n = int(lengths[j])
                fresh_h[index[r]] = out.hidden[j, :n].clone()
                if "logits" in self.outputs:
                    fresh_z[index[r]] = out.scores[j].clone()
                if layers:
                    fresh_l[index[r]] = stacked[j, :, :n].clone()
            if self.cache:
                self._hidden.update(fresh_h)
                self._scores.update(fresh_z)
                self._layers.update(fresh_l)
        store_h = self._hidden if self.cache else fresh_h
        store_z = self._scores if self.cache else fresh_z
        store_l = self._layers if self.cache else fresh_l
        first = store_h[index[0]]
        T = max(store_h[i].shape[0] for i in index)
        hidden = first.new_zeros(len(index), T, first.shape[-1])
        every = first.new_zeros(len(index), store_l[index[0]].shape[0], T, first.shape[-1]) if layers else None
        for row, i in enumerate(index):
            h = store_h[i]
            hidden[row, : h.shape[0]] = h
            if layers:
                every[row, :, : h.shape[0]] = store_l[i]
        scores = torch.stack([store_z[i] for i in index]) if "logits" in self.outputs else None
        return hidden, scores, every


def distill_loss(teacher: tuple, student: TaskOutput, outputs: tuple[str, ...]) -> torch.Tensor:
    """MSE between teacher and student on the chosen outputs (hidden states: the student's real positions
    only; ``layers``: the mean over layers of each layer's MSE)."""
    t_hidden, t_scores = teacher[0], teacher[1]
    loss = student.hidden.new_zeros(())
    m = student.mask.bool()
    T = m.shape[1]

    def fit(t: torch.Tensor) -> torch.Tensor:  # the teacher's rows were cut at their real length
        t = t.to(student.hidden)
        return F.pad(t, (0, 0, 0, T - t.shape[-2])) if t.shape[-2] < T else t[..., :T, :]

    if "hidden" in outputs:
        loss = loss + F.mse_loss(student.hidden[m], fit(t_hidden)[m])
    if "layers" in outputs:
        if student.layers is None:
            raise ValueError("layer-wise distillation needs the student run with output_layers=True")
        t_layers = fit(teacher[2])  # (N, L, T, H)
        loss = loss + sum(F.mse_loss(h[m], t_layers[:, k][m]) for k, h in enumerate(student.layers)) / len(student.layers)
    if "logits" in outputs:
        loss = loss + F.mse_loss(student.scores, t_scores.to(student.scores))
    return loss
