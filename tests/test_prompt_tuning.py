"""Prompt tuning through the registry: virtual tokens in front of the input on every layer type (the
heads see the real tokens only), save / load exactly, inheritance as a copy, decoder LMs and T5 text-to-
text, a run through the paradigms, PEFT interop, and refusals where a path would skip the tokens."""

import copy
import json

import pytest
import torch

from cpet.config import load_config
from cpet.errors import CpetError
from cpet.inherit import inherit
from cpet.layers import freeze_backbone
from cpet.pet.prompt import PromptConfig
from cpet.task_modules import build_task_model, load_task_modules, save_task_modules
from tests.conftest import tiny_llama_lm, tiny_t5_lm, train_steps
from tests.test_pet_methods import PLANS, _compressed


def _by_hand(backbone, prompt, batch):
    """The backbone on [P; E(x)] with the mask extended, the prompt positions cut off again."""
    emb = backbone.get_input_embeddings()(batch["input_ids"])
    n, k = emb.shape[0], prompt.shape[0]
    out = backbone(inputs_embeds=torch.cat([prompt.expand(n, -1, -1), emb], 1),
                   attention_mask=torch.cat([torch.ones(n, k, dtype=batch["attention_mask"].dtype),
                                             batch["attention_mask"]], 1),
                   token_type_ids=torch.cat([torch.zeros(n, k, dtype=torch.long), batch["token_type_ids"]], 1))
    return out.last_hidden_state[:, k:]


@pytest.mark.parametrize("plan", list(PLANS))
def test_virtual_tokens_on_each_layer_type(plan, batch, tmp_path):
    bb = _compressed(plan)
    model = build_task_model(copy.deepcopy(bb), 2, pet=PromptConfig(tokens=4)).eval()
    prompt = model.prompt.embeddings.detach()
    with torch.no_grad():
        out = model(**batch)
        assert out.hidden.shape == (*batch["input_ids"].shape, bb.config.hidden_size)  # the real tokens only
        torch.testing.assert_close(out.hidden, _by_hand(model.backbone, prompt, batch), rtol=0, atol=0)
        assert not torch.allclose(out.hidden, bb(**batch).last_hidden_state)  # the prompt does something
    assert set(freeze_backbone(model)) == {"prompt.embeddings", "head.out.weight", "head.out.bias"}
    changed = train_steps(model.train(), batch, torch.tensor([1, 0, 1]))
    assert "prompt.embeddings" in changed and all(k.startswith(("head.", "prompt.")) for k in changed)
    folder = save_task_modules(model, tmp_path / "task")
    desc = json.loads((folder / "task_config.json").read_text())
    assert desc["prompt"] == {"modules": {"prompt": ["prompt"]}, "tokens": 4, "init": "vocab"}
    back = load_task_modules(copy.deepcopy(bb), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


def test_the_vocab_init_starts_from_real_token_embeddings_and_inheritance_copies_the_prompt(batch):
    torch.manual_seed(0)
    teacher = build_task_model(_compressed("none"), 2, pet=PromptConfig(tokens=3))
    emb = teacher.backbone.get_input_embeddings().weight
    assert all((emb == row).all(-1).any() for row in teacher.prompt.embeddings)  # each row is some token's embedding
    rnd = build_task_model(_compressed("none"), 2, pet=PromptConfig(tokens=3, init="random"))
    assert not any((emb == row).all(-1).any() for row in rnd.prompt.embeddings)
    with torch.no_grad():
        teacher.prompt.embeddings.add_(0.5)
    for plan in ("SP+Q", "M+Q"):  # compression keeps the hidden size: the prompt moves as it is
        student = build_task_model(_compressed(plan), 2, pet=PromptConfig(tokens=3))
        assert "prompt.embeddings" in inherit(student, teacher)
        assert torch.equal(student.prompt.embeddings, teacher.prompt.embeddings)


@pytest.mark.parametrize("make", [tiny_llama_lm, tiny_t5_lm])
def test_language_models_get_the_prompt_in_front(make):
    lm = make()
    model = build_task_model(copy.deepcopy(lm), 0, pet=PromptConfig(tokens=2)).eval()
    ids = torch.randint(5, 90, (2, 6))
    mask = torch.ones_like(ids)
    p = model.prompt.embeddings.detach()
    emb = lm.get_input_embeddings()(ids)
    kw = dict(inputs_embeds=torch.cat([p.expand(2, -1, -1), emb], 1), attention_mask=torch.ones(2, 8, dtype=torch.long))
    with torch.no_grad():
        if lm.config.is_encoder_decoder:
            dec = torch.randint(5, 90, (2, 3))
            got = model(ids, mask, decoder_input_ids=dec, decoder_attention_mask=torch.ones_like(dec)).logits
            want = lm(**kw, decoder_input_ids=dec, decoder_attention_mask=torch.ones_like(dec)).logits
        else:
            got = model(ids, mask).logits
            want = lm(**kw).logits[:, 2:]  # the real tokens' next-token logits
            last = model(ids, mask, logits_to_keep=1).logits
            torch.testing.assert_close(last, want[:, -1:], rtol=1e-5, atol=1e-6)
            chosen = model(ids, mask, logits_to_keep=torch.tensor([1, 4])).logits  # positions of the real tokens
            torch.testing.assert_close(chosen, want[:, [1, 4]], rtol=1e-5, atol=1e-6)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_paths_that_would_skip_the_prompt_refuse(tokenizer):
    from cpet.evals.mmlu import _causal_lm, run_lm_eval
    from cpet.formats import get_format
    from cpet.tasks import TASKS

    model = build_task_model(tiny_llama_lm(), 0, pet=PromptConfig(tokens=2))
    pytest.importorskip("lm_eval")
    with pytest.raises(CpetError, match="lm-eval does not support virtual-token PET"):
        run_lm_eval(model, tokenizer)
    assert _causal_lm(model) is None  # MMLU scores it through the task model's forward, without a prefix cache
    from cpet.evals.mmlu import next_token_logits

    from cpet.pet.prefix import PrefixConfig

    rows = [[5, 17, 300, 42], [9, 8, 7]]  # rows of different lengths: each row's last real token's next-token logits
    for scored in (model, build_task_model(tiny_llama_lm(), 0, pet=PrefixConfig(tokens=2))):  # prompt, prefix
        assert _causal_lm(scored) is None
        got = next_token_logits(scored.eval(), rows, 0)
        for i, r in enumerate(rows):
            with torch.no_grad():
                want = scored(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).logits[0, -1]
            torch.testing.assert_close(got[i], want.float(), rtol=1e-4, atol=1e-5)


def test_a_run_tunes_a_prompt_through_every_paradigm(tmp_path, data_dir, tiny_model_dir):
    """pet: {method: prompt}: base+PET, CLM+PET and CLM+CPET (inherited prompt + recovery + distillation
    on the real tokens' states) run and save a prompt; CPET's starts from base+PET's."""
    from cpet.experiments import run_experiment

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2",
                             f"task.data_dir={data_dir}", "task.val_size=16", "task.max_test=8", "train.epochs=1",
                             "recovery.r=4", "compress=UP+Q", "paradigms=[base_pet, clm_pet, clm_cpet]",
                             "pet={method: prompt, tokens: 4}", f"output_dir={tmp_path / 'r'}"])
    res = {r["paradigm"]: r for r in run_experiment(cfg, log=lambda s: None)}
    for p in ("base_pet", "clm_pet", "clm_cpet"):
        desc = json.loads((tmp_path / "r" / p / "task" / "task_config.json").read_text())
        assert desc["prompt"]["tokens"] == 4 and "lora" not in desc and ("recovery" in desc) == (p == "clm_cpet")
        assert res[p]["config"]["pet"]["method"] == "prompt"


def test_prompt_tuning_round_trips_through_the_real_peft_package(tmp_path, batch, tokenizer):
    """cpet's prompt exported loads in PEFT (encoder: FEATURE_EXTRACTION; causal LM: CAUSAL_LM) and gives
    cpet's states / logits on the real tokens; PEFT's own prompt-tuning adapter imported into cpet gives
    PEFT's; the task folder verbs move the same tensor."""
    peft = pytest.importorskip("peft")
    from cpet.cli import main
    from cpet.pet.peft_io import export_peft, import_peft
    from cpet.models import LMTaskModel, TaskModel
    from tests.conftest import save_tiny, tiny_bert

    ours = build_task_model(tiny_bert(), 2, pet=PromptConfig(tokens=3))
    with pytest.raises(CpetError, match="task head"):
        export_peft(ours, tmp_path / "x")
    export_peft(ours, tmp_path / "enc", pet_only=True)
    assert json.loads((tmp_path / "enc" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "enc").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).last_hidden_state[:, 3:], ours.eval()(**batch).hidden,
                                   rtol=1e-5, atol=1e-5)

    path = save_tiny(tiny_llama_lm(), tokenizer, tmp_path / "lm")
    lm_task = build_task_model(tiny_llama_lm(), 0, pet=PromptConfig(tokens=2))
    folder = save_task_modules(lm_task, tmp_path / "task", extra={"task": "sst2", "backbone": {"path": path, "plan": []}})
    assert main(["export-peft", str(folder), "-o", str(tmp_path / "peft")]) == 0
    pm = peft.PeftModel.from_pretrained(tiny_llama_lm(), tmp_path / "peft").eval()
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        want = lm_task.eval()(ids, torch.ones_like(ids)).logits
        torch.testing.assert_close(pm(input_ids=ids).logits[:, 2:], want, rtol=1e-5, atol=1e-5)
    assert main(["import-peft", str(tmp_path / "peft"), "--backbone", path, "-o", str(tmp_path / "back")]) == 0
    back = load_task_modules(tiny_llama_lm(), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, torch.ones_like(ids)).logits, want, rtol=0, atol=0)

    theirs = peft.get_peft_model(tiny_bert(), peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                      num_virtual_tokens=4))
    theirs.eval().save_pretrained(tmp_path / "theirs")
    model = TaskModel(tiny_bert(), 2)
    assert import_peft(model, tmp_path / "theirs") == ["prompt"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).hidden, theirs(**batch).last_hidden_state[:, 4:],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(CpetError, match="not a bare backbone"):
        import_peft(tiny_bert(), tmp_path / "theirs")
    assert isinstance(LMTaskModel(tiny_llama_lm()), TaskModel)


@pytest.mark.parametrize("make,method", [(tiny_llama_lm, "prompt"), (tiny_t5_lm, "prompt"), (tiny_llama_lm, "prefix")])
def test_a_prompt_or_prefix_tuned_lm_generates_from_it(make, method, tokenizer):
    """Greedy generation of a prompt- or prefix-tuned text-to-text task equals a greedy loop over the task
    model's own forward (the prompt in front / the prefix cache before the input)."""
    from cpet.formats import _end_token, get_format
    from cpet.pet.prefix import PrefixConfig
    from cpet.tasks import TASKS, Example

    cfg = PromptConfig(tokens=3) if method == "prompt" else PrefixConfig(tokens=3)
    model = build_task_model(make(), 0, pet=cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "prompt." in n or "prefix_kv" in n:
                p.normal_(0, 1.0)
    fmt = get_format(TASKS["squad"], model)
    examples = [Example("who won ?", "the cat won the race .", 0, answers=("the cat",)),
                Example("where ?", "in paris , a long time ago .", 0, answers=("paris",))]
    got = fmt.generate(model, tokenizer, examples, 64)
    assert any(got), got  # something was generated to compare
    assert got == [fmt.generate(model, tokenizer, [ex], 64)[0] for ex in examples]  # batched (padded) == alone
    eos = _end_token(tokenizer)
    for ex, answer in zip(examples, got):  # one row at a time: no padding
        row = fmt._row(tokenizer, fmt.spec.prompt(ex), None, 64 - fmt.max_new_tokens)
        ids = torch.tensor([row["input_ids"]])
        toks = []
        with torch.no_grad():
            if model.seq2seq:
                dec = torch.tensor([[model.config.decoder_start_token_id]])
                for _ in range(fmt.max_new_tokens):
                    t = int(model(ids, torch.ones_like(ids), decoder_input_ids=dec,
                                  decoder_attention_mask=torch.ones_like(dec)).logits[0, -1].argmax())
                    toks.append(t)
                    dec = torch.cat([dec, torch.tensor([[t]])], 1)
                    if t == eos:
                        break
            else:
                seq = ids
                for _ in range(fmt.max_new_tokens):
                    t = int(model(seq, torch.ones_like(seq)).logits[0, -1].argmax())
                    toks.append(t)
                    seq = torch.cat([seq, torch.tensor([[t]])], 1)
                    if t == eos:
                        break
        want = tokenizer.decode(toks, skip_special_tokens=True).strip().split("\n")[0].strip()
        assert answer == want
