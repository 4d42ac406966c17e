"""int8 SQNR and kernels, exact sparsity, N:M patterns, composition, bit-exact save/load."""

import copy

import pytest
import torch
import torch.nn as nn

from cpet.compress import compress, load_compressed, parse_plan, save_compressed
from cpet.compress.int8 import Int8Linear, quantize_per_channel, sqnr_db
from cpet.compress.unstructured import magnitude_mask, nm_mask
from cpet.errors import CpetError

# Per-channel symmetric int8 of Gaussian weights gives ~38-41 dB; 35 dB leaves room, and a real
# bug (wrong axis, off-by-one scale, clipping) drops far below it.
SQNR_DB_MIN = 35.0


def test_int8_weight_sqnr_and_storage():
    torch.manual_seed(0)
    lin = nn.Linear(384, 1536)
    q = Int8Linear.from_linear(lin)
    assert q.weight_int8.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert sqnr_db(lin.weight, q.dequantize()) > SQNR_DB_MIN
    assert not any(p.is_floating_point() and p.numel() == lin.weight.numel() for p in q.buffers())


def test_int8_outlier_row_keeps_other_rows_precise():
    w = torch.randn(8, 64)
    w[3] *= 1000  # per-channel scales: one wild row must not wreck the rest
    q, s = quantize_per_channel(w)
    deq = q.float() * s[:, None]
    others = [i for i in range(8) if i != 3]
    assert sqnr_db(w[others], deq[others]) > SQNR_DB_MIN


def test_int8_training_path_computes_the_served_function():
    """grad on (fake-quant + dequantized matmul) == grad off (fbgemm int8 GEMM) up to fp32 rounding,
    and both quantize activations (neither is the float-activation product)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 512)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(4, 16, 256)
    x[0, 3] *= 50  # an outlier token
    train_path = q(x)  # grad mode on
    with torch.no_grad():
        served = q(x)
    torch.testing.assert_close(train_path, served, rtol=1e-5, atol=1e-5)
    assert sqnr_db(lin(x), served) > 30.0
    assert not torch.allclose(served, x @ q.dequantize().T + q.bias, atol=1e-4), "activations are not quantized"


def test_int8_rounding_matches_fbgemm_at_ties():
    """Near-tie activations (k + 1/2 steps, +- 1e-6) quantize to the same level in both paths."""
    from cpet.compress.int8 import STEP, fake_quant_tokens, prepack, w8a8_linear

    eye = torch.eye(128)
    q, s = quantize_per_channel(eye)
    torch.manual_seed(1)
    k = torch.randint(-63, 63, (512, 128)).float()
    x = ((k + 0.5) * STEP + (torch.rand(512, 128) - 0.5) * 2e-6).clamp(-1, 1)
    x[:, 0] = 1.0  # each row's max |x| is 1: the per-token scale is STEP itself
    with torch.no_grad():
        served = w8a8_linear(x, prepack(q, s), None)
    torch.testing.assert_close(served, fake_quant_tokens(x), rtol=0, atol=1e-6)


def test_int8_token_output_independent_of_batch_mates_and_chunking():
    """A token's output depends on that token only: an outlier elsewhere, the batch size and the
    kernel's chunking (CHUNK_ROWS) leave it bit-identical."""
    from cpet.compress import int8

    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(int8.CHUNK_ROWS + 37, 64)
    with torch.no_grad():
        full = q(x)
        wild = x.clone()
        wild[5] *= 1000
        assert torch.equal(q(wild)[6:], full[6:])
        for i in (0, 1, int8.CHUNK_ROWS - 1, int8.CHUNK_ROWS, len(x) - 1):
            assert torch.equal(q(x[i: i + 1]), full[i: i + 1])
        zero = torch.zeros(2, 64)
        torch.testing.assert_close(q(zero), q.bias.expand(2, -1), rtol=0, atol=0)


def test_int8_gradient_flows_to_input():
    q = Int8Linear.from_linear(nn.Linear(16, 8))
    x = torch.randn(3, 16, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(3, 16))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_exact_sparsity(sparsity):
    w = torch.randn(37, 53)
    mask = magnitude_mask(w, sparsity)
    assert (~mask).sum().item() == round(sparsity * w.numel())
    if 0 < sparsity:
        assert w[mask].abs().min() >= w[~mask].abs().max()


def test_nm_pattern_2_4():
    w = torch.randn(16, 32)
    mask = nm_mask(w, 2, 4)
    assert (mask.reshape(16, 8, 4).sum(-1) == 2).all()
    with pytest.raises(CpetError, match="divisible"):
        nm_mask(torch.randn(4, 6), 2, 4)


def _linears(model):
    from cpet.models import compressible_layers

    return compressible_layers(model, ("q", "k", "v", "o", "ffn_in", "ffn_out"))


@pytest.mark.parametrize("order", [["unstructured", "int8"], ["int8", "unstructured"]])
def test_prune_and_int8_compose_in_either_order(any_backbone, order):
    plan = [{"method": m, **({"sparsity": 0.5} if m == "unstructured" else {})} for m in order]
    model = compress(any_backbone, plan)
    for name, layer in _linears(model).items():
        assert isinstance(layer, Int8Linear), name
        zeros = (layer.weight_int8 == 0).float().mean().item()
        assert zeros >= 0.5 - 1e-6, (name, zeros)


def test_compressed_save_load_bit_exact(tmp_path, batch, tokenizer):
    from conftest import tiny_bert

    model = compress(tiny_bert(), [{"method": "unstructured", "pattern": "2:4"}, {"method": "int8"}])
    save_compressed(model, tokenizer, tmp_path / "c", [{"method": "unstructured", "pattern": "2:4"},
                                                       {"method": "int8"}], source="tiny")
    loaded, tok, meta = load_compressed(tmp_path / "c")
    assert meta["plan"][0]["pattern"] == "2:4"
    with torch.no_grad():
        a = model(**batch).last_hidden_state
        b = loaded(**batch).last_hidden_state
    assert torch.equal(a, b)
    # stored as int8, not float: the file is far smaller than the fp32 linears
    size = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert tok is not None and size > 0


def test_plan_errors():
    with pytest.raises(CpetError, match="unknown method 'gptq'"):
        parse_plan([{"method": "gptq"}])
    with pytest.raises(CpetError, match="unknown field 'sparsty'"):
        parse_plan([{"method": "unstructured", "sparsty": 0.5}])
    with pytest.raises(CpetError, match="must lie in"):
        parse_plan([{"method": "unstructured", "sparsity": 1.5}])
    with pytest.raises(CpetError, match="N:M"):
        parse_plan([{"method": "unstructured", "pattern": "half"}])
    with pytest.raises(CpetError, match="list of steps"):
        parse_plan({"method": "int8"})


def test_wanda_uses_activations_and_keeps_row_sparsity(batch):
    from conftest import tiny_bert
    from cpet.compress.calibration import Calibration, input_stats

    calib = Calibration(torch.randint(1000, 5000, (4, 16), generator=torch.Generator().manual_seed(0)), 2)
    dense = tiny_bert()
    stats = input_stats(dense, ["encoder.layer.0.intermediate.dense"], calib)["encoder.layer.0.intermediate.dense"]
    wanda = compress(copy.deepcopy(dense), [{"method": "unstructured", "score": "wanda", "sparsity": 0.5}],
                     calibration=calib)
    mag = compress(copy.deepcopy(dense), [{"method": "unstructured", "sparsity": 0.5}])
    w = wanda.encoder.layer[0].intermediate.dense.weight
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # exactly half of every row
    W = dense.encoder.layer[0].intermediate.dense.weight
    score = W.abs() * stats["sq"].sqrt()
    # within each row the kept entries out-score the pruned ones
    for r in range(W.shape[0]):
        assert score[r][w[r] != 0].min() >= score[r][w[r] == 0].max()
    assert not torch.equal(w != 0, mag.encoder.layer[0].intermediate.dense.weight != 0)


def test_global_magnitude_total_sparsity():
    from conftest import tiny_bert
    from cpet.models import compressible_layers

    model = compress(tiny_bert(), [{"method": "unstructured", "sparsity": 0.6, "scope": "global"}])
    layers = compressible_layers(model, ("q", "k", "v", "o", "ffn_in", "ffn_out")).values()
    zeros = sum((l.weight == 0).sum().item() for l in layers)
    total = sum(l.weight.numel() for l in layers)
    assert abs(zeros / total - 0.6) < 1e-3
    per_layer = [(l.weight == 0).float().mean().item() for l in layers]
    assert max(per_layer) - min(per_layer) > 0.01  # global: layers differ


def test_wanda_needs_calibration():
    from conftest import tiny_bert

    with pytest.raises(CpetError, match="calibration"):
        compress(tiny_bert(), [{"method": "unstructured", "score": "wanda"}])


def test_int8_embedding(any_backbone, batch):
    from cpet.compress.int8 import Int8Embedding

    emb = any_backbone.get_input_embeddings()
    ids = batch["input_ids"]
    ref = emb(ids).detach()
    model = compress(any_backbone, [{"method": "int8", "targets": ["embed"]}])
    q = model.get_input_embeddings()
    assert isinstance(q, Int8Embedding) and q.weight_int8.dtype == torch.int8
    assert sqnr_db(ref, q(ids)) > SQNR_DB_MIN
    assert not any(isinstance(m, nn.Embedding) and m.num_embeddings == 30522 for m in model.modules())


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_full_int8_save_load_other_families(tmp_path, tokenizer, family):
    from conftest import BACKBONES

    model = compress(BACKBONES[family](), "UP+Q")
    save_compressed(model, tokenizer, tmp_path / "c", "UP+Q", source="tiny")
    loaded, _, _ = load_compressed(tmp_path / "c")
    ids = torch.randint(1000, 5000, (2, 9))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        b = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.equal(a, b)


def test_sparse_packing_round_trip_and_smaller_file(tmp_path, tokenizer):
    from conftest import tiny_bert
    from cpet.compress import pack_sparse, unpack_sparse

    for t in (torch.randn(7, 13) * (torch.rand(7, 13) > 0.5), torch.randint(-127, 127, (16, 32), dtype=torch.int8)):
        values, bits = pack_sparse(t)
        assert torch.equal(unpack_sparse(values, bits, t.shape), t)
    dense_q = compress(tiny_bert(), "Q")
    sparse_q = compress(tiny_bert(), "UP+Q")
    save_compressed(dense_q, None, tmp_path / "q", "Q", source="tiny")
    save_compressed(sparse_q, None, tmp_path / "upq", "UP+Q", source="tiny")
    meta = __import__("json").loads((tmp_path / "upq" / "compression.json").read_text())
    assert len(meta["sparse"]) == 2 * 6  # every 2:4 linear weight of both layers is stored packed
    linear_bytes = sum(l.weight_int8.numel() for l in _linears(dense_q).values())
    saved = (tmp_path / "q" / "model.safetensors").stat().st_size - (tmp_path / "upq" / "model.safetensors").stat().st_size
    # values 0.5 B + mask 0.125 B per weight instead of 1 B: 0.375 B saved, less the extra header entries
    assert saved >= 0.25 * linear_bytes


def test_smoothquant_exact_in_float_and_round_trips(tmp_path, batch, tokenizer):
    from conftest import tiny_bert
    from cpet.compress.calibration import Calibration

    calib = Calibration(torch.randint(1000, 5000, (4, 16), generator=torch.Generator().manual_seed(0)), 2)
    dense = tiny_bert()
    plan = [{"method": "int8", "smooth": 0.5}]
    model = compress(copy.deepcopy(dense), plan, calibration=calib)
    q = model.encoder.layer[0].intermediate.dense
    assert q.smooth.shape == (32,) and not torch.allclose(q.smooth, torch.ones(32))
    # in exact arithmetic x/s @ (W s)^T == x @ W^T: the int8 weight-only path stays close to fp32
    x = torch.randn(5, 32)
    ref = dense.encoder.layer[0].intermediate.dense(x)
    assert sqnr_db(ref, q(x)) > 30.0  # grad on: dequantized path
    save_compressed(model, tokenizer, tmp_path / "c", plan, source="tiny")
    loaded, _, _ = load_compressed(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, loaded(**batch).last_hidden_state)
    with pytest.raises(CpetError, match="calibration"):
        compress(copy.deepcopy(dense), plan)


def test_csr_kernel_equals_dense_masked_and_round_trips(tmp_path, batch, tokenizer):
    from conftest import tiny_bert
    from cpet.compress.unstructured import CSRLinear

    dense = compress(tiny_bert(), [{"method": "unstructured", "sparsity": 0.9, "kernel": "dense"}])
    csr = compress(tiny_bert(), [{"method": "unstructured", "sparsity": 0.9, "kernel": "csr"}])
    layers = [m for m in csr.modules() if isinstance(m, CSRLinear)]
    assert len(layers) == 12 and all(len(l.values) == round(0.1 * l.in_features * l.out_features) for l in layers)
    with torch.no_grad():
        torch.testing.assert_close(csr(**batch).last_hidden_state, dense(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 32, requires_grad=True)  # gradients reach the input through the sparse matmul
    layers[0](x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    plan = [{"method": "unstructured", "sparsity": 0.9, "kernel": "csr"}]
    save_compressed(csr, tokenizer, tmp_path / "c", plan, source="tiny")
    loaded, _, _ = load_compressed(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(csr(**batch).last_hidden_state, loaded(**batch).last_hidden_state)


def test_int8_weight_only_roles_stay_on_the_dequant_path(tmp_path, tokenizer):
    """weight_only roles compute int8-weight x fp32-activation also at inference (exactly the dequantized
    weight's output), the others take the W8A8 kernel; the choice survives save / load."""
    from conftest import tiny_llama_lm

    from cpet.compress import compress, load_compressed, save_compressed
    from cpet.compress.int8 import Int8Linear

    plan = [{"method": "int8", "weight_only": ["ffn_out"]}]
    lm = compress(tiny_llama_lm(), plan)
    down, up = lm.model.layers[0].mlp.down_proj, lm.model.layers[0].mlp.up_proj
    assert isinstance(down, Int8Linear) and down.kernel == "dequant" and up.kernel == "auto"
    x = torch.randn(3, down.in_features)
    with torch.no_grad():
        torch.testing.assert_close(down(x), x @ down.dequantize().T, rtol=0, atol=1e-6)
    save_compressed(lm, tokenizer, tmp_path / "c", plan, "tiny")
    again, _, _ = load_compressed(tmp_path / "c")
    assert again.model.layers[1].mlp.down_proj.kernel == "dequant" and again.model.layers[1].mlp.up_proj.kernel == "auto"


def test_int8_refuses_a_layer_it_cannot_quantize():
    """A CSR layer left by unstructured pruning would silently stay fp32 under a plan that says int8."""
    from conftest import tiny_bert

    with pytest.raises(CpetError, match="CSRLinear.*put int8 before unstructured"):
        compress(tiny_bert(), [{"method": "unstructured", "sparsity": 0.9, "kernel": "csr"}, {"method": "int8"}])
    compress(tiny_bert(), [{"method": "int8"}, {"method": "int8"}])  # int8 twice: already int8, fine
