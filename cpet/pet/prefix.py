"""Prefix tuning (Li & Liang, 2021; P-tuning v2): ``tokens`` trainable key / value vectors in front of every
attention layer's own.

    attention_l(x) = softmax(q [P_k^l; k(x)]^T / sqrt(d)) [P_v^l; v(x)]      P_k^l, P_v^l: (tokens, kv width)

The prefixes reach the backbone as a pre-filled KV cache (the way PEFT feeds them, so a cpet prefix and
a PEFT ``PREFIX_TUNING`` adapter compute the same function: tested), with the attention mask extended
over them; the real tokens' positions come after them, as in PEFT. Each layer's prefixes are stored on
its key / value projection (``prefix_kv.p``: (tokens, out)), so after structured pruning inheritance
slices them to the heads the student kept, like any branch's output axis. No layer computes anything
different: every compression (int8, sparse, 2:4, structured, MoE) runs under it.

``init: vocab`` (default) starts each layer's prefixes from the keys / values the frozen backbone computes
for ``tokens`` random vocabulary tokens; ``random`` from noise of their scale. Decoder LMs and encoders;
encoder-decoders (T5) are refused. Greedy generation continues the prefix cache; lm-eval and the serving
bank refuse a prefix-tuned task (they call the backbone themselves); cpet's MMLU scores it without its
shared-prefix cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import DynamicCache

from cpet.errors import CpetError
from cpet.layers import attach, register_kind
from cpet.models import ARCHITECTURES, cache_arg, get_arch, target_modules
from cpet.pet.base import PetMethod
from cpet.pet.prompt import TokensConfig, peft_task_type, require_task_model

register_kind("prefix_kv", "model", rank=90)  # on the k / v projections; ``Adapted`` does not call it
register_kind("prefix", "model", rank=20, trainable=False)  # the task model's hook that feeds them in
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class PrefixConfig(TokensConfig):  # (its own class: the registry tells methods apart by their config's type)
    pass


class PrefixKV(nn.Module):
    """One layer's key (or value) prefix, (tokens, the projection's output width)."""

    AXES = {"p": ("out", 1)}

    def __init__(self, tokens: int, out_features: int, init: str = "vocab"):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(tokens, out_features))
        self.init = init

    def hparams(self) -> dict:
        return {"tokens": self.p.shape[0], "init": self.init}


class PrefixCache(nn.Module):
    """Feeds the prefixes in: the mask extended over them, and a KV cache pre-filled with them."""

    def __init__(self, pairs: list[tuple[int, str, str]], head_dim: int, tokens: int):
        super().__init__()
        self.pairs = pairs  # (attention layer index, key projection path, value projection path), under the backbone
        self.head_dim, self.tokens = head_dim, tokens

    def extend(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return embeds, torch.cat([mask.new_ones(mask.shape[0], self.tokens), mask], dim=1), 0

    def backbone_kwargs(self, backbone: nn.Module, batch: int) -> dict:
        cache = DynamicCache()
        for idx, k, v in self.pairs:
            kv = [backbone.get_submodule(p).prefix_kv.p for p in (k, v)]  # (tokens, heads * head_dim)
            kv = [t.view(t.shape[0], -1, self.head_dim).transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)
                  for t in kv]
            cache.update(kv[0], kv[1], idx)
        return {cache_arg(backbone): cache}


class PrefixMethod(PetMethod):
    name, Config, kinds, peft_type = "prefix", PrefixConfig, ("prefix_kv",), "PREFIX_TUNING"

    def make(self, in_features: int, out_features: int, cfg: PrefixConfig, kind: str) -> nn.Module:
        return PrefixKV(cfg.tokens, out_features, cfg.init)

    def peft_reads(self, key):
        return key == "prompt_embeddings"

    def peft_import(self, model, cfg, tensors, what):
        """PEFT's ``prompt_embeddings`` (tokens, layers * 2 * width): per attention layer its key then its
        value prefixes, cpet's ``prefix_kv.p`` on each key / value projection; ``prefix_projection: false``
        only (no reparameterizing MLP)."""
        return _peft_import(self, model, cfg, tensors, what)

    def peft_export(self, desc, state, base_config, what):
        return _peft_export(desc, state, base_config, what)

    def apply(self, model: nn.Module, cfg: PrefixConfig) -> list[str]:
        backbone = self._backbone(model)
        layers = target_modules(model, ("k", "v"))
        attach(model, layers, "prefix_kv", lambda i, o: PrefixKV(cfg.tokens, o, cfg.init))
        self._hook(model)
        with torch.no_grad():  # the keys / values of random vocabulary tokens, layer by layer
            seen: dict[str, torch.Tensor] = {}
            hooks = [model.get_submodule(n).base.register_forward_hook(
                lambda mod, args, out, n=n: seen.__setitem__(n, out[0].detach())) for n in layers]
            ids = torch.randint(0, min(5000, backbone.get_input_embeddings().weight.shape[0]), (1, cfg.tokens))
            training = backbone.training
            try:
                backbone.eval()(input_ids=ids.to(next(backbone.parameters()).device))  # no dropout in the init
            finally:
                backbone.train(training)
                for h in hooks:
                    h.remove()
            for n in layers:
                p = model.get_submodule(n).prefix_kv.p
                value = seen[n].float()
                p.copy_(value if cfg.init == "vocab" else torch.randn_like(value) * float(value.std()))
        return sorted(layers)

    def rebuild(self, model: nn.Module, desc: dict) -> None:
        super().rebuild(model, desc)
        self._hook(model)

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        require_task_model(model, "prefix tuning")
        if get_arch(model.backbone).kind == "encoder-decoder":
            raise CpetError("prefix tuning on encoder-decoder models (T5) is not in yet: use prompt tuning or LoRA")
        if cache_arg(model.backbone) is None:
            raise CpetError(f"{type(model.backbone).__name__}'s forward takes no KV cache: prefix tuning cannot "
                            "reach its attention")
        return model.backbone

    def _hook(self, model: nn.Module) -> None:
        """The task model's PrefixCache for the prefixes on its layers (one key and one value per attention)."""
        backbone = self._backbone(model)
        pairs = kv_pairs([n[len("backbone."):] for n in self.placed(model).get("prefix_kv", [])])
        model.prefix = PrefixCache(pairs, head_dim(backbone.config.to_dict()),
                                   backbone.get_submodule(pairs[0][1]).prefix_kv.p.shape[0])

    def attach_tensors(self, model: nn.Module, prefixes: torch.Tensor, what: str) -> list[str]:
        """Attach prefixes given in PEFT's layout, (tokens, layers * 2 * width): per attention layer in order,
        its keys then its values."""
        backbone = self._backbone(model)
        pairs = kv_pairs(list(target_modules(backbone, ("k", "v"))))
        width = backbone.get_submodule(pairs[0][1]).out_features
        if prefixes.ndim != 2 or prefixes.shape[1] != len(pairs) * 2 * width:
            raise CpetError(f"{what}: prefixes of shape {tuple(prefixes.shape)} do not fit this backbone "
                            f"({len(pairs)} attention layers x key and value x {width})")
        chunks = prefixes.float().split(width, dim=1)
        names = []
        for j, (_, k, v) in enumerate(pairs):
            for t, rel in zip(chunks[2 * j: 2 * j + 2], (k, v)):
                attach(model, ["backbone." + rel], "prefix_kv", lambda i, o: PrefixKV(prefixes.shape[0], o, "vocab"))
                with torch.no_grad():
                    model.get_submodule("backbone." + rel).prefix_kv.p.copy_(t)
                names.append("backbone." + rel)
        self._hook(model)
        return sorted(names)


def _peft_import(method, model, cfg, tensors, what):
    if "prompt_embeddings" not in tensors:
        raise CpetError(f"{what}: no prompt_embeddings in adapter_model.safetensors")
    if cfg.get("prefix_projection"):
        raise CpetError(f"{what}: prefix_projection (an MLP reparameterizing the prefixes) is not supported "
                        "by cpet; re-save the adapter's computed prefixes, or train without it")
    return method.attach_tensors(model, tensors["prompt_embeddings"], what), {}


def _peft_export(desc, state, base_config, what):
    if base_config is None:
        raise CpetError(f"{what}: writing prefixes needs the base model's config (its head width); name the "
                        "base model (--base-model)")
    layers = len(desc["prefix"]["modules"]["prefix_kv"]) // 2  # a key and a value projection each
    flat = peft_prefixes(desc["prefix"], state, what)
    width = flat.shape[1] // (2 * layers)
    return {"prompt_embeddings": flat}, {
        "num_virtual_tokens": flat.shape[0], "token_dim": width, "num_layers": layers,
        "num_attention_heads": width // head_dim(base_config), "encoder_hidden_size": width,
        "prefix_projection": False, "num_transformer_submodules": 1, "task_type": peft_task_type(desc, base_config)}


def peft_prefixes(entry: dict, state: dict[str, torch.Tensor], what: str) -> torch.Tensor:
    """A task folder's prefixes (its ``prefix`` entry and tensors) in PEFT's layout, (tokens, layers * 2 *
    width): per attention layer in order, its keys then its values (what ``attach_tensors`` reads)."""
    parts = [state[f"{n}.prefix_kv.p"] for _, k, v in kv_pairs(entry["modules"]["prefix_kv"]) for n in (k, v)]
    if len({t.shape[1] for t in parts}) != 1:
        raise CpetError(f"{what}: its layers' prefixes differ in width (structurally pruned heads), which a PEFT "
                        "prefix adapter cannot hold")
    return torch.cat(parts, dim=1).contiguous()


def head_dim(config: dict) -> int:
    """The attention head width of a model config (as a dict)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def kv_pairs(names: list[str]) -> list[tuple[int, str, str]]:
    """(attention layer index, key projection, value projection) in layer order, from the names of key and
    value projections (any registered architecture's)."""
    by_layer: dict[int, dict[str, str]] = {}
    for n in sorted(names):
        m = _LAYER.search(n)
        role = next((r for r in ("k", "v") for a in ARCHITECTURES.values() if re.search(a.roles[r], n)), None)
        if m is None or role is None:
            raise CpetError(f"prefix tuning: {n!r} is not the key or value projection of a numbered layer")
        by_layer.setdefault(int(m.group(1)), {})[role] = n
    if not by_layer or any(set(d) != {"k", "v"} for d in by_layer.values()):
        raise CpetError("prefix tuning needs a key and a value prefix on every attention layer it adapts")
    return [(i, d["k"], d["v"]) for i, d in sorted(by_layer.items())]


METHOD = PrefixMethod()
