# Can the recovery module's own nonlinear form, act(x D^T + b) U^T with r GELU units, undo what the MoE FFN drops,
# where a linear map could not (oneoff_moe_compensation.py)? (one-off measurement, no training)
# Units: r of the dense FFN's own neurons (W_in rows + b_in), the r whose output best aligns with the MoE's error
# on the fitting half of the calibration tokens; U three ways: the neurons' own W_out columns ("raw", a shared
# expert added beside the routed ones), least squares on the error ("ls"), least squares on the units and the
# input together ("ls+lin"). Fitted on half the calibration tokens, measured (relative output error) on the other.
import copy

import torch

from cpet.compress import moefication as mf
from cpet.compress.calibration import make_calibration, record_inputs, run
from cpet.models import load_backbone

torch.manual_seed(0)
dense, tok = load_backbone("minilm", lm=False)
calib = make_calibration(tok)
model = copy.deepcopy(dense)
blocks = mf.ffn_blocks(dense)
inputs = {}
with torch.no_grad(), record_inputs(dense, [b.ins[0] for b in blocks],
                                    lambda n, x: inputs.setdefault(n, []).append(x.reshape(-1, x.shape[-1]))):
    run(dense, calib)
with torch.no_grad():
    mf.apply(model, mf.Config(experts=16, top=0.25, min_speedup=0), calib, log=lambda s: None)  # the grid's M
    for blk in blocks:
        xs = torch.cat(inputs[blk.ins[0]]).double()
        n = xs.shape[0]
        fit, ev = slice(0, n // 2), slice(n // 2, n)
        y = mf.dense_ffn(blk, dense, xs.float()).double()
        ym = model.get_submodule(blk.block)(xs.float()).double()
        R = y - ym  # what the MoE drops

        def err(pred):
            return ((pred[ev] - y[ev]).norm() / y[ev].norm()).item()

        w_in, w_out = dense.get_submodule(blk.ins[0]), dense.get_submodule(blk.out)
        W1, b1, W2 = w_in.weight.double(), w_in.bias.double(), w_out.weight.double()
        H = torch.nn.functional.gelu(xs @ W1.T + b1)  # every neuron's activation, (N, d_ff)
        score = ((H[fit].T @ R[fit]) * W2.T).sum(1)  # how much each neuron's output aligns with the error
        X1 = torch.cat([xs, torch.ones(n, 1, dtype=xs.dtype)], 1)
        lin = torch.linalg.lstsq(X1[fit], R[fit]).solution
        line = f"{blk.block}: moe {err(ym):.3f}  full linear {err(ym + X1 @ lin):.3f}"
        for r in (32, 64, 128, 256):
            top = score.topk(r).indices
            F = H[:, top]
            F1 = torch.cat([F, xs], 1)
            U = torch.linalg.lstsq(F[fit], R[fit]).solution
            U1 = torch.linalg.lstsq(F1[fit], R[fit]).solution
            raw = F @ W2[:, top].T
            line += f" | r{r} raw {err(ym + raw):.3f} ls {err(ym + F @ U):.3f} ls+lin {err(ym + F1 @ U1):.3f}"
        print(line, flush=True)
