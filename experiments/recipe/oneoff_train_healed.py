"""One-off: CLM+CPET (recipe setting: MNLI, mix, 1000 ex, lr 1e-3, 3 epochs, seed 42) starting from the
task-agnostically healed recovery modules (/tmp/heal/rec_200.safetensors), vs the recipe store's CLM+CPET
(43.5 test) and CLM+PET (43.7)."""
import copy
import sys
import torch
from safetensors.torch import load_file
from cpet.config import TaskConfig, RecoveryConfig, TrainConfig, DistillConfig
from cpet.pet.lora import LoraConfig
from cpet.tasks import load_task, TASKS
from cpet.compress import load_compressed
from cpet.models import load_backbone
from cpet.task_modules import load_task_modules, build_task_model, load_into
from cpet.inherit import inherit
from cpet.train import train, evaluate

lr = float(sys.argv[1]) if len(sys.argv) > 1 else 1e-3
store = "experiments/recipe/store"
cb, tok, _ = load_compressed(f"{store}/backbones/5f42e014799c4e35")
base, _ = load_backbone("minilm")
teacher = load_task_modules(copy.deepcopy(base), f"{store}/paradigms/base_pet-04938345942fce36/task").eval()
data = load_task(TaskConfig(name="mnli", max_train=1000, val_size=500, max_test=1000))
spec = TASKS["mnli"]
torch.manual_seed(42)
student = build_task_model(cb, spec.head_size, lora=LoraConfig(r=8, alpha=16, targets=("q", "v")),
                           recovery=RecoveryConfig(r=32))
inherit(student, teacher)
load_into(student, {"backbone." + k: v for k, v in load_file("/tmp/heal/rec_200.safetensors").items()})
res = train(student, tok, spec, data.train, data.val, TrainConfig(epochs=3, batch_size=32, lr=lr, seed=42), 128,
            teacher=teacher, distill=DistillConfig(), log=lambda s: print(s, flush=True) if "val" in s else None, resume=False)
m = evaluate(student.eval(), tok, spec, data.test, 128)
print("healed CLM+CPET lr", lr, "best val", res.best_val if hasattr(res, "best_val") else res, "test", m, flush=True)
