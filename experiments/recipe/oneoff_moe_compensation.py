# How much of the MoE FFN's output error is the dropped experts' mean output? (one-off measurement)
import copy, torch
from cpet.models import load_backbone
from cpet.compress.calibration import make_calibration, record_inputs, run
from cpet.compress import moefication as mf
torch.manual_seed(0)
dense, tok = load_backbone("minilm", lm=False)
calib = make_calibration(tok)
for top in (0.25, 0.5):
    model = copy.deepcopy(dense)
    cfg = mf.Config(experts=16, top=top, min_speedup=0)
    blocks = mf.ffn_blocks(dense)
    inputs = {}
    with torch.no_grad(), record_inputs(dense, [b.ins[0] for b in blocks], lambda n, x: inputs.setdefault(n, []).append(x.reshape(-1, x.shape[-1]))):
        run(dense, calib)
    with torch.no_grad():
        mf.apply(model, cfg, calib, log=lambda s: None)
        for blk in blocks:
            xs = torch.cat(inputs[blk.ins[0]]); n = xs.shape[0]; half = n // 2
            moe = model.get_submodule(blk.block)
            y = mf.dense_ffn(blk, dense, xs); ym = moe(xs)
            idx = moe.route(xs)
            sel = torch.zeros(n, moe.experts, dtype=torch.bool); sel.scatter_(1, idx, True)
            # each expert's output per token (no b_out)
            outs = torch.stack([moe._expert(xs, e, False) for e in range(moe.experts)], 1)  # (N, E, d)
            fit, ev = slice(0, half), slice(half, n)
            drop = (~sel).float()
            c_uncond = outs[fit].mean(0)  # (E, d)
            c_cond = (outs[fit] * drop[fit, :, None]).sum(0) / drop[fit].sum(0).clamp(min=1)[:, None]
            def err(pred): return ((pred[ev] - y[ev]).norm() / y[ev].norm()).item()
            comp_u = ym + drop @ c_uncond; comp_c = ym + drop @ c_cond
            # best linear (with bias) map of x to the residual, fitted on the first half
            X = torch.cat([xs, torch.ones(n, 1)], 1); R = y - ym
            W = torch.linalg.lstsq(X[fit], R[fit]).solution
            print(f"top {top} {blk.block}: moe {err(ym):.3f}  +mean(dropped) {err(comp_u):.3f}  +cond mean {err(comp_c):.3f}  +full linear fit {err(ym + X @ W):.3f}", flush=True)
