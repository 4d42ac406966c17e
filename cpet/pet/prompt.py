"""Prompt tuning (Lester et al., 2021, "The power of scale for parameter-efficient prompt tuning"):
``tokens`` trainable embeddings put in front of every input's token embeddings.

    h = backbone([P; E(x)], mask = [1...1; mask(x)])      P: (tokens, d)

The model sees the virtual tokens at the first positions (position embeddings count them, as in PEFT);
heads, losses and metrics see the real tokens only (``TaskModel.backbone_inputs`` slices them off
again). T5 gets them on its encoder input. Nothing is attached to a layer, so every layer type
(int8, pruned, structurally pruned, MoE) works under it, and inheritance is a copy (compression
keeps the hidden size). ``init: vocab`` starts from the embeddings of random vocabulary tokens (the
paper's sampled-vocabulary init), ``random`` from N(0, std of the embedding matrix). PEFT's type is
``PROMPT_TUNING`` (``prompt_embeddings``: (tokens, d)).

Greedy generation starts from the prompt + the input's embeddings. Not yet: lm-eval and the fused bank
call the backbone themselves (they refuse a task with virtual tokens instead of skipping them); MMLU
scores it without its shared-prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.errors import CpetError
from cpet.layers import register_kind
from cpet.pet.base import PetMethod
from cpet.typed import coerce_fields, require

register_kind("prompt", "model", rank=10)
INITS = ("vocab", "random")


@dataclass(frozen=True)
class TokensConfig:
    """Options shared by prompt and prefix tuning: how many virtual tokens, and where they start."""

    tokens: int = 20
    init: str = "vocab"

    def __post_init__(self):
        coerce_fields(self, "pet")
        require(self.tokens >= 1, "pet.tokens", self.tokens, ">= 1")
        require(self.init in INITS, "pet.init", self.init, f"one of {INITS}")


@dataclass(frozen=True)
class PromptConfig(TokensConfig):
    pass


class VirtualTokens(nn.Module):
    """``tokens`` embeddings put in front of the input sequence."""

    AXES: dict = {}  # the hidden size: kept by every compression method

    def __init__(self, tokens: int, dim: int, init: str = "vocab"):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(tokens, dim))
        self.init = init

    def extend(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """([P; embeds], [1; mask], tokens) for a batch of input embeddings (N, T, d) and its mask (N, T)."""
        n = embeds.shape[0]
        prompt = self.embeddings.to(embeds.dtype).unsqueeze(0).expand(n, -1, -1)
        return (torch.cat([prompt, embeds], dim=1),
                torch.cat([mask.new_ones(n, self.embeddings.shape[0]), mask], dim=1), self.embeddings.shape[0])

    def hparams(self) -> dict:
        return {"tokens": self.embeddings.shape[0], "init": self.init}


def require_task_model(model: nn.Module, what: str) -> None:
    """Virtual-token PET lives on a cpet task model (its forward puts the tokens in), not on a bare backbone."""
    if not hasattr(model, "virtual_tokens"):
        raise CpetError(f"{what} attaches to a cpet task model (TaskModel / LMTaskModel), not a bare backbone")


class PromptMethod(PetMethod):
    name, Config, kinds, peft_type = "prompt", PromptConfig, ("prompt",), "PROMPT_TUNING"

    def apply(self, model: nn.Module, cfg: PromptConfig) -> list[str]:
        emb = model.backbone.get_input_embeddings().weight.detach()
        module = VirtualTokens(cfg.tokens, emb.shape[1], cfg.init)
        with torch.no_grad():
            if cfg.init == "vocab":  # the paper's init: sampled from the 5,000 most frequent tokens; ids here
                ids = torch.randint(0, min(5000, emb.shape[0]), (cfg.tokens,))  # (frequency order is unknown)
                module.embeddings.copy_(emb[ids].float())
            else:
                module.embeddings.normal_(0.0, float(emb.float().std()))
        self.attach_to(model, module)
        return ["prompt"]

    def attach_tensors(self, model: nn.Module, embeddings: torch.Tensor, what: str) -> list[str]:
        """Attach a prompt given as its (tokens, d) embeddings (PEFT's ``prompt_embeddings``)."""
        require_task_model(model, "prompt tuning")
        dim = model.backbone.get_input_embeddings().weight.shape[1]
        if embeddings.ndim != 2 or embeddings.shape[1] != dim:
            raise CpetError(f"{what}: prompt embeddings {tuple(embeddings.shape)} do not fit this backbone's "
                            f"embedding size {dim}")
        self.attach_to(model, VirtualTokens(embeddings.shape[0], dim, "random"))
        with torch.no_grad():
            model.prompt.embeddings.copy_(embeddings.float())
        return ["prompt"]

    def peft_reads(self, key):
        return key == "prompt_embeddings"

    def peft_import(self, model, cfg, tensors, what):
        """PEFT's ``prompt_embeddings`` (tokens, d) is cpet's ``prompt.embeddings``."""
        if "prompt_embeddings" not in tensors:
            raise CpetError(f"{what}: no prompt_embeddings in adapter_model.safetensors")
        if int(cfg.get("num_transformer_submodules") or 1) != 1:
            raise CpetError(f"{what}: num_transformer_submodules={cfg['num_transformer_submodules']} (prompts on the "
                            "decoder input too); cpet puts virtual tokens on the encoder only")
        return self.attach_tensors(model, tensors["prompt_embeddings"], what), {}

    def peft_export(self, desc, state, base_config, what):
        emb = state["prompt.embeddings"]
        return {"prompt_embeddings": emb.contiguous()}, {
            "num_virtual_tokens": emb.shape[0], "token_dim": emb.shape[1], "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM", "task_type": peft_task_type(desc, base_config)}

    @staticmethod
    def attach_to(model: nn.Module, module: VirtualTokens) -> None:
        require_task_model(model, "prompt tuning")
        model.prompt = module

    def placed(self, model: nn.Module) -> dict[str, list[str]]:
        return {"prompt": ["prompt"]} if model._modules.get("prompt") is not None else {}

    def describe(self, model: nn.Module) -> dict | None:
        module = model._modules.get("prompt")
        return None if module is None else {"modules": {"prompt": ["prompt"]}, **module.hparams()}

    def rebuild(self, model: nn.Module, desc: dict) -> None:
        dim = model.backbone.get_input_embeddings().weight.shape[1]
        self.attach_to(model, VirtualTokens(int(desc["tokens"]), dim, desc.get("init", "vocab")))


def peft_task_type(desc: dict, base_config: dict | None) -> str:
    """The PEFT task type whose model class puts virtual tokens in front as cpet does: SEQ_2_SEQ_LM (the
    encoder's input of an encoder-decoder), CAUSAL_LM (a decoder LM's text-to-text task), else
    FEATURE_EXTRACTION (an encoder; cpet's task head is not PEFT's)."""
    if (base_config or {}).get("is_encoder_decoder"):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM" if desc.get("head") == "lm" else "FEATURE_EXTRACTION"


METHOD = PromptMethod()
