"""cpet serve: a real uvicorn server on loopback, driven by a real HTTP client (httpx)."""

import socket
from contextlib import contextmanager
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from cpet.cli import _open_bank
from cpet.predict import Item, predict
from cpet.serve.app import create_app
from cpet.serve.engine import Engine
from tests.conftest import train_on_shared_backbone

SENTENCES = ["a great film", "a dull mess", "i loved it", "boring and long", "superb", "painfully bad " * 20]




@contextmanager
def serving(engine: Engine, timeout: float = 30):
    """A real uvicorn server for ``engine`` on a free loopback port, and an httpx client to it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as client:
            yield client
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        engine.close()


@pytest.fixture
def server(tmp_path, data_dir, tiny_model_dir):
    """Two trained tasks (CLM+PET, CLM+CPET on SST-2) on a compressed tiny BERT, served on a free port."""
    cdir, run, _ = train_on_shared_backbone(tmp_path, data_dir, tiny_model_dir, tmp_path / "tasks" / "run")
    pet, cpet = run / "clm_pet" / "task", run / "clm_cpet" / "task"
    bank, tok = _open_bank(str(cdir), [f"pet={pet}", f"cpet={cpet}"])
    engine = Engine(bank, tok, max_length=32, max_batch=8, max_wait_ms=20, task_root=str(tmp_path / "tasks"))
    # the offline reference: cpet predict's answers on a separate bank
    ref_bank, ref_tok = _open_bank(str(cdir), [f"pet={pet}", f"cpet={cpet}"])
    ref = {(r["id"], r["task"]): r for r in predict(ref_bank, ref_tok, [Item(s) for s in SENTENCES], max_length=32)}
    with serving(engine) as client:
        yield client, ref, {"pet": pet, "cpet": cpet, "root": tmp_path / "tasks", "run": tmp_path / "tasks" / "run"}


def _same(got: dict, want: dict) -> None:
    assert got["label"] == want["label"] and got.get("truncated") == want.get("truncated")
    for k, v in want["probabilities"].items():
        assert abs(got["probabilities"][k] - v) < 1e-5


def test_classify_matches_offline_predictions_and_mixes_tasks(server):
    client, ref, _ = server
    assert client.get("/health").json() == {"status": "ok", "tasks": 2}
    r = client.post("/v1/classify", json={"task": ["pet", "cpet"], "input": SENTENCES})
    assert r.status_code == 200
    res = r.json()["results"]
    assert len(res) == 2 * len(SENTENCES)
    for x in res:
        _same(x, ref[(x["input"], x["task"])])
    assert res[-1]["truncated"] is True  # the long sentence was cut to 32 tokens, and says so

    def one(i):  # concurrent single requests land in shared, mixed batches; each answer is its own
        task = ["pet", "cpet"][i % 2]
        out = client.post("/v1/classify", json={"task": task, "input": SENTENCES[i % len(SENTENCES)]})
        return i, task, out.json()["results"][0]

    with ThreadPoolExecutor(8) as pool:
        for i, task, got in pool.map(one, range(24)):
            _same(got, ref[(i % len(SENTENCES), task)])
    metrics = client.get("/metrics").text
    assert 'cpet_requests_total{route="classify",task="pet"}' in metrics and "cpet_batch_rows_bucket" in metrics
    tasks = client.get("/v1/tasks").json()
    assert {t["name"] for t in tasks["tasks"]} == {"pet", "cpet"} and all(t["bytes"] > 0 for t in tasks["tasks"])


def test_bad_input_is_never_a_server_error(server, tmp_path):
    client, ref, paths = server
    r = client.post("/v1/classify", json={"task": "nope", "input": "x"})
    assert r.status_code == 404 and "cpet" in r.json()["error"] and "pet" in r.json()["error"]
    assert client.post("/v1/classify", json={"input": "x"}).status_code == 422
    assert client.post("/v1/classify", content=b"{not json").status_code == 422
    assert client.post("/v1/tasks/load", json={"name": "x", "path": str(tmp_path)}).status_code == 403
    broken = paths["root"] / "broken"
    broken.mkdir()
    (broken / "task_config.json").write_text("{truncated")
    (broken / "task_modules.safetensors").write_bytes(b"\x00" * 10)
    r = client.post("/v1/tasks/load", json={"name": "broken", "path": str(broken)})
    assert r.status_code == 400 and "task_config.json" in r.json()["error"]
    r = client.post("/v1/tasks/load", json={"name": "teacher", "path": str(paths["run"] / "base_pet" / "task")})
    assert r.status_code == 400 and "trained on backbone" in r.json()["error"]
    assert client.post("/v1/extract", json={"task": "pet", "question": "q", "context": "c"}).status_code == 400
    _same(client.post("/v1/classify", json={"task": "pet", "input": SENTENCES[0]}).json()["results"][0],
          ref[(0, "pet")])  # still serving


def test_unload_and_load_back(server):
    client, ref, paths = server
    assert client.post("/v1/tasks/unload", json={"name": "pet"}).json() == {"name": "pet", "unloaded": True}
    assert client.post("/v1/classify", json={"task": "pet", "input": "x"}).status_code == 404
    assert client.post("/v1/tasks/unload", json={"name": "pet"}).status_code == 404
    _same(client.post("/v1/classify", json={"task": "cpet", "input": SENTENCES[1]}).json()["results"][0],
          ref[(1, "cpet")])  # the other task moved slots and answers the same
    r = client.post("/v1/tasks/load", json={"name": "pet2", "path": str(paths["pet"]), "pin": True})
    assert r.status_code == 200 and r.json()["name"] == "pet2"
    _same(client.post("/v1/classify", json={"task": "pet2", "input": SENTENCES[2]}).json()["results"][0],
          ref[(2, "pet")])


def test_a_language_model_classifies_and_generates_from_one_process(tmp_path, data_dir, tokenizer):
    """A tiny causal LM trained text-to-text (CLM+PET on SST-2): cpet predict reproduces the run's test
    accuracy through the bank; the server answers /v1/classify (verbalizers) and /v1/generate."""
    from cpet.config import TaskConfig, load_config
    from cpet.experiments import run_experiment
    from cpet.tasks import load_task
    from tests.conftest import save_tiny, tiny_llama_lm

    path = save_tiny(tiny_llama_lm(), tokenizer, tmp_path / "lm")
    out = tmp_path / "run"
    rec = run_experiment(load_config(None, [
        f"model.name={path}", "model.max_length=64", "task.name=sst2", f"task.data_dir={data_dir}", "task.val_size=16",
        "train.epochs=1", "train.batch_size=8", "compress=[{method: int8}]", "paradigms=[base_pet, clm_pet]",
        f"output_dir={out}"]), log=lambda s: None)[1]
    bank, tok = _open_bank(str(out / "backbone_compressed"), [f"s={out / 'clm_pet' / 'task'}"])
    test = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16)).test
    preds = list(predict(bank, tok, [Item(e.text_a) for e in test], max_length=64))
    labels = list(bank.tasks["s"].labels)
    acc = sum(labels.index(p["label"]) == e.label for p, e in zip(preds, test)) / len(test)
    assert acc == pytest.approx(rec["test"]["accuracy"])

    engine = Engine(bank, tok, max_length=64, max_batch=8, max_wait_ms=5, backbone_dir=str(out / "backbone_compressed"),
                    adapt_rank=4, task_root=str(tmp_path))
    from cpet.models import load_backbone
    from cpet.pet.peft_io import export_peft
    from cpet.task_modules import load_task_modules

    teacher = load_task_modules(load_backbone(path, lm=True)[0], out / "base_pet" / "task")
    export_peft(teacher, tmp_path / "peft", base_model_name_or_path=path)
    with serving(engine, timeout=60) as c:
        r = c.post("/v1/classify", json={"task": "s", "input": [e.text_a for e in test[:3]]})
        assert r.status_code == 200 and [x["label"] for x in r.json()["results"]] == [p["label"] for p in preds[:3]]
        r = c.post("/v1/generate", json={"task": "s", "input": "a fine film", "max_tokens": 4})
        assert r.status_code == 200 and isinstance(r.json()["results"][0]["text"], str)
        # a PEFT LoRA of the uncompressed model loads as a task (inherited + fitted recovery, no data)
        r = c.post("/v1/tasks/load", json={"name": "peft", "path": str(tmp_path / "peft"), "task": "sst2"})
        assert r.status_code == 200 and r.json()["adapted_from_peft"] is True
        r = c.post("/v1/classify", json={"task": "peft", "input": [e.text_a for e in test[:2]]})
        assert r.status_code == 200 and all(x["label"] in labels for x in r.json()["results"])
