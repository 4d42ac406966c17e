"""int8 fidelity on a decoder LM (default SmolLM2, after `cpet convert-gguf`): token-logit cosine and
top-1 agreement to the fp32 model, per int8 variant, on Alpaca-format text. Backs the README's advice
to keep LLaMA-family down-projections weight-only.

    .venv/bin/python bench/fidelity_int8_llm.py [--model smollm2] [--texts 8]

Writes bench/results/int8_fidelity_<model>.md. SmolLM2's weights were 4-bit quantized by their
publisher; its "fp32" reference is that model dequantized.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from cpet.compress import compress
from cpet.models import load_backbone
from cpet.tasks import resolve_data_dir
from cpet.tasks.alpaca import _example, alpaca_prompt

VARIANTS = {
    "W8A8 (kernel auto), every linear + embedding + tied head": [{"method": "int8"}],
    **{f"W8A8 on {r} only": [{"method": "int8", "targets": [r]}] for r in ("q", "k", "v", "o", "ffn_in", "ffn_out")},
    "W8A8, ffn_out weight-only": [{"method": "int8", "weight_only": ["ffn_out"]}],
    "W8A8, ffn_in + ffn_out weight-only": [{"method": "int8", "weight_only": ["ffn_in", "ffn_out"]}],
    "weight-only everywhere (kernel dequant)": [{"method": "int8", "kernel": "dequant"}],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--texts", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    ref, tok = load_backbone(args.model, lm=True)
    rows = json.loads((resolve_data_dir(None) / "alpaca" / "alpaca_data_1k.json").read_text())[-args.texts:]
    texts = [alpaca_prompt(_example(r)) + r["output"] for r in rows]
    enc = [tok(t, return_tensors="pt", truncation=True, max_length=256)["input_ids"] for t in texts]
    with torch.no_grad():
        refs = [ref(input_ids=ids).logits[0] for ids in enc]
    lines = [f"# int8 fidelity on {args.model}: logits vs fp32 ({args.texts} Alpaca texts, {sum(e.shape[1] for e in enc)} tokens)",
             "", "SmolLM2's weights were 4-bit quantized by their publisher; the reference is that model in fp32.", "",
             "| variant | logit cosine (mean over tokens) | top-1 agreement |", "|---|---|---|"]
    for name, plan in VARIANTS.items():
        model = compress(copy.deepcopy(ref), plan)
        cos, agree, n = 0.0, 0.0, 0
        with torch.no_grad():
            for ids, a in zip(enc, refs):
                b = model(input_ids=ids).logits[0]
                cos += torch.nn.functional.cosine_similarity(a, b, dim=-1).sum().item()
                agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
                n += a.shape[0]
        lines.append(f"| {name} | {cos / n:.4f} | {agree / n:.3f} |")
        print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / f"int8_fidelity_{args.model}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
