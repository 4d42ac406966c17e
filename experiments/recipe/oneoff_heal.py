"""One-off: does task-agnostic healing of recovery modules (distilling the uncompressed backbone's hidden
states on Alpaca windows) win back the mix plan's damage with no task data? MNLI, teacher = recipe store's
base+PET (seed 42, 5e-3, 1000 examples)."""
import copy
import sys
import time
import torch
from cpet.config import TaskConfig, RecoveryConfig
from cpet.tasks import load_task, TASKS
from cpet.compress import load_compressed
from cpet.compress.calibration import make_calibration
from cpet.models import load_backbone
from cpet.pet.lora import LoraConfig
from cpet.task_modules import load_task_modules, build_task_model, load_into
from cpet.inherit import inherit
from cpet.layers import kind_of
from cpet.recovery import apply as rec_apply
from cpet.train import evaluate
from safetensors.torch import save_file

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
torch.manual_seed(0)
store = "experiments/recipe/store"
cb, tok, meta = load_compressed(f"{store}/backbones/5f42e014799c4e35")
base, _ = load_backbone("minilm")
base.eval()
teacher = load_task_modules(copy.deepcopy(base), f"{store}/paradigms/base_pet-04938345942fce36/task").eval()
data = load_task(TaskConfig(name="mnli", max_train=1000, val_size=500, max_test=1000))
spec = TASKS["mnli"]
calib = make_calibration(tok, samples=512, seq_len=128)
ids = calib.input_ids
train_ids, held = ids[:448], ids[448:]
print("windows", ids.shape, flush=True)

def hiddens(model, x):
    return model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True).hidden_states[1:]

with torch.no_grad():
    ref_held = [h for h in hiddens(base, held)]
def err(model):
    with torch.no_grad():
        hs = hiddens(model, held)
        return [float(((a - b).pow(2).mean() / b.pow(2).mean())) for a, b in zip(hs, ref_held)]

def acc(student):
    r = {}
    for split in ("val", "test"):
        m = evaluate(student.eval(), tok, spec, getattr(data, split), 128)
        r[split] = round(100 * m[list(m)[0]], 2)
    return r

# zero-data baseline: inherited modules alone
student0 = build_task_model(copy.deepcopy(cb), spec.head_size, lora=LoraConfig(r=8, alpha=16, targets=("q", "v")))
inherit(student0, teacher)
print("inherited alone", acc(student0), flush=True)

healed = copy.deepcopy(cb)
rec_apply(healed, RecoveryConfig(r=32))
params = [p for n, p in healed.named_parameters() if kind_of(n) == "recovery"]
for n, p in healed.named_parameters():
    p.requires_grad_(kind_of(n) == "recovery")
print("relerr before", [round(e, 4) for e in err(healed)], flush=True)
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / STEPS))
t0 = time.time()
g = torch.Generator().manual_seed(0)
for step in range(STEPS):
    b = train_ids[torch.randint(0, len(train_ids), (8,), generator=g)]
    with torch.no_grad():
        ref = hiddens(base, b)
    hs = hiddens(healed.train(), b)
    loss = sum(((a - r).pow(2).mean() / r.pow(2).mean()) for a, r in zip(hs, ref)) / len(hs)
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if step % 25 == 0 or step == STEPS - 1:
        print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
healed.eval()
print("relerr after", [round(e, 4) for e in err(healed)], flush=True)
save_file({n: p.detach().contiguous() for n, p in healed.named_parameters() if kind_of(n) == "recovery"}, f"/tmp/heal/rec_{STEPS}.safetensors")
student = build_task_model(copy.deepcopy(cb), spec.head_size, lora=LoraConfig(r=8, alpha=16, targets=("q", "v")),
                           recovery=RecoveryConfig(r=32))
inherit(student, teacher)
state = {"backbone." + n: p for n, p in healed.named_parameters() if kind_of(n) == "recovery"}
load_into(student, state)
print("inherited + healed recovery", acc(student), flush=True)
