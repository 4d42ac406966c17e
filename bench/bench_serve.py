"""Serving many tasks from one compressed MiniLM: throughput, latency and memory over HTTP, on loopback.

For N = 1, 8, 32 loaded tasks and three task popularities (uniform, Zipf s=1.1, distinct: consecutive
requests never share a task), a real ``cpet serve`` process is driven by an open-loop async httpx
generator (Poisson arrivals at a fixed rate, bounded in count and time). Baselines in the same run:
one task only, and a naive server that keeps one set of task branches and swaps each task's tensors
in per request group. Also measured in-process: the latency of the fused CPET add-on path (LoRA +
recovery on every linear) over CLM+PET's (LoRA on q, v) on the same batches, and over the unfused
per-branch reference.

Tasks are same-shape random modules (LoRA r8 on q,v + recovery r32 on every linear + a 2-way head:
a CLM+CPET task's shape; compute does not depend on the values). Writes bench/results/serve.{md,json}.
Run on an idle machine (nothing else on the 2 cores):

    .venv/bin/python bench/bench_serve.py [--requests 300] [--rate 0]   (rate 0 = 70% of measured capacity)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpet.timing import interleaved

OUT = Path(__file__).parent / "results"
SENTENCES = [
    "a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés from start to finish",
    "it 's a charming and often affecting journey .", "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .", "a sometimes tedious film .", "it 's slow -- very , very slow .",
    "a thoughtful , provocative , insistently humanizing film .", "the film is strictly routine .",
    "there 's a lot to recommend read my lips .", "an ugly , pointless , stupid movie .",
    "one of the greatest family-oriented , fantasy-adventure movies ever .",
]


# ---------------------------------------------------------------- set-up: backbone + task folders
def make_tasks(root: Path, n: int, plan: str) -> tuple[Path, list[Path], Path]:
    """A compressed MiniLM, ``n`` CLM+CPET-shaped random task folders and one CLM+PET-shaped one."""
    from cpet.cli import main as cli
    from cpet.compress import load_compressed
    from cpet.config import LoraConfig, RecoveryConfig
    from cpet.task_modules import build_task_model, save_task_modules

    cdir = root / "backbone"
    if not (cdir / "compression.json").is_file():
        assert cli(["compress", "minilm", "--plan", plan, "-o", str(cdir)]) == 0
    bb, _, meta = load_compressed(cdir)
    fp = {"fingerprint": meta["fingerprint"]["hash"], "path": str(cdir)}
    folders = []
    for i in range(n):
        torch.manual_seed(i)
        m = build_task_model(copy.deepcopy(bb), 2, lora=LoraConfig(r=8), recovery=RecoveryConfig(r=32))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(("lora.B", "recovery.U")) or name.startswith("head."):
                    p.normal_(0, 0.02)
        folders.append(save_task_modules(m, root / "tasks" / f"t{i:02d}",
                                         extra={"task": "sst2", "labels": ["negative", "positive"], "backbone": fp}))
    pet = build_task_model(copy.deepcopy(bb), 2, lora=LoraConfig(r=8))
    with torch.no_grad():
        for name, p in pet.named_parameters():
            if name.endswith("lora.B") or name.startswith("head."):
                p.normal_(0, 0.02)
    pet_dir = save_task_modules(pet, root / "tasks" / "pet", extra={"task": "sst2", "labels": ["negative", "positive"],
                                                                   "backbone": fp})
    return cdir, folders, pet_dir


# ---------------------------------------------------------------- the fused path vs CLM+PET (in-process)
def path_latency(cdir: Path, cpet_dir: Path, pet_dir: Path, repeats: int) -> dict:
    from cpet.bank import TaskBank
    from cpet.compress import load_compressed
    from cpet.formats import pad_rows
    from cpet.task_modules import load_task_modules

    out = {}
    for shape, rows in (("1x", 1), ("32x", 32)):
        bank_c, tok = TaskBank.open(cdir)
        bank_c.load("cpet", cpet_dir)
        bank_p, _ = TaskBank.open(cdir)
        bank_p.load("pet", pet_dir)
        plain = load_task_modules(load_compressed(cdir)[0], cpet_dir).eval()
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(rows)]
        batch = pad_rows([{k: v for k, v in tok(t, truncation=True, max_length=128).items() if k != "attention_mask"}
                          for t in texts], tok.pad_token_id)

        def unfused():
            with torch.no_grad():
                plain(**batch)

        t = interleaved({"clm_pet": lambda: bank_p.scores(["pet"] * rows, **batch),
                         "clm_cpet_fused": lambda: bank_c.scores(["cpet"] * rows, **batch),
                         "clm_cpet_unfused": unfused}, repeats)
        out[shape + str(len(batch["input_ids"][0]))] = {k: round(v * 1000, 3) for k, v in t.items()}
    return out


# ---------------------------------------------------------------- the naive baseline server
def naive_server(cdir: str, tasks: list[str], port: int) -> None:
    """One set of task branches; each request group's task tensors are copied in before it runs."""
    import uvicorn

    from cpet.bank import TaskBank
    from cpet.compress import load_compressed
    from cpet.io import load_safetensors
    from cpet.serve.app import create_app
    from cpet.serve.engine import Engine
    from cpet.task_modules import load_into, load_task_modules

    bank, tok = TaskBank.open(cdir)  # holds names / labels / heads for the app; the model is `swap`
    states = {}
    for spec in tasks:
        name, path = spec.split("=", 1)
        bank.load(name, path)
        states[name] = load_safetensors(Path(path) / "task_modules.safetensors", "task", "")
    swap = load_task_modules(load_compressed(cdir)[0], tasks[0].split("=", 1)[1]).eval()

    class Naive(Engine):
        current = None

        def scores(self, names, **batch):
            out = []
            for name in dict.fromkeys(names):  # per task group: swap its tensors in, run its rows
                idx = [i for i, n in enumerate(names) if n == name]
                if self.current != name:
                    load_into(swap, states[name])
                    self.current = name
                with torch.no_grad():
                    out += list(swap(**{k: v[idx] for k, v in batch.items()}).logits)
            return out

    engine = Naive(bank, tok, max_batch=32, max_wait_ms=5)
    uvicorn.run(create_app(engine), host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------- load generation
def popularity(kind: str, names: list[str], n: int, rng: random.Random) -> list[str]:
    if kind == "uniform" or len(names) == 1:
        return [rng.choice(names) for _ in range(n)]
    if kind == "zipf":
        w = [1 / (k + 1) ** 1.1 for k in range(len(names))]
        return rng.choices(names, weights=w, k=n)
    return [names[i % len(names)] for i in range(n)]  # distinct: consecutive requests differ


async def drive(port: int, tasks: list[str], rate: float, max_s: float) -> dict:
    """Open loop: request i is sent at its Poisson arrival time whatever happened to the others."""
    import httpx

    rng = random.Random(0)
    gaps = [rng.expovariate(rate) for _ in tasks]
    lat, errors = [], 0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                 limits=httpx.Limits(max_connections=256)) as client:
        async def one(i: int, task: str):
            nonlocal errors
            t = time.perf_counter()
            try:
                r = await client.post("/v1/classify", json={"task": task, "input": SENTENCES[i % len(SENTENCES)]})
                if r.status_code != 200:
                    errors += 1
                else:
                    lat.append(time.perf_counter() - t)
            except httpx.HTTPError:
                errors += 1

        start = time.perf_counter()
        pending, at = [], 0.0
        for i, task in enumerate(tasks):
            at += gaps[i]
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() - start > max_s:
                break
            pending.append(asyncio.create_task(one(i, task)))
        await asyncio.gather(*pending)
        wall = time.perf_counter() - start
    lat.sort()
    q = lambda p: round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None  # noqa: E731
    return {"sent": len(pending), "ok": len(lat), "errors": errors, "req_per_s": round(len(lat) / wall, 1),
            "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99)}


def start(cmd: list[str], port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in 300 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(server: str, cdir: Path, folders: list[Path], pop: str, n_req: int, rate: float, max_s: float) -> dict:
    import httpx

    port = free_port()
    named = [f"t{i:02d}={f}" for i, f in enumerate(folders)]
    if server == "cpet":
        cmd = [sys.executable, "-m", "cpet.cli", "serve", "--backbone", str(cdir), *named, "--port", str(port)]
    else:
        cmd = [sys.executable, __file__, "--naive-server", str(cdir), str(port), *named]
    proc = start(cmd, port)
    try:
        info = httpx.get(f"http://127.0.0.1:{port}/v1/tasks", timeout=10).json()
        names = [t["name"] for t in info["tasks"]]
        tasks = popularity(pop, names, n_req, random.Random(1))
        asyncio.run(drive(port, tasks[: min(20, n_req)], rate, 10))  # warm-up
        res = asyncio.run(drive(port, tasks, rate, max_s))
        return {"tasks": len(names), "popularity": pop, "server": server, **res, "rss_mb": rss_mb(proc.pid),
                "task_bytes": info.get("task_bytes"), "bank_bytes": info.get("bank_bytes")}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def capacity(cdir: Path, folder: Path) -> float:
    """Requests per second one task sustains with 32 requests always in flight (closed loop, 5 s)."""
    import httpx

    port = free_port()
    proc = start([sys.executable, "-m", "cpet.cli", "serve", "--backbone", str(cdir), f"t00={folder}",
                  "--port", str(port)], port)

    async def closed() -> float:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            done, stop = 0, time.perf_counter() + 5

            async def worker(k: int):
                nonlocal done
                while time.perf_counter() < stop:
                    await client.post("/v1/classify", json={"task": "t00", "input": SENTENCES[k % len(SENTENCES)]})
                    done += 1
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(32)))
            return done / (time.perf_counter() - t0)
    try:
        asyncio.run(closed())  # warm-up
        return asyncio.run(closed())
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def soak(cdir: Path, folders: list[Path], seconds: float, rate: float) -> dict:
    """``seconds`` of open-loop load on 8 tasks while another client unloads and reloads one of them
    every 2 s: every request must get an answer (200, or 404 while its task is away), never a 5xx."""
    import httpx

    port = free_port()
    named = [f"t{i:02d}={f}" for i, f in enumerate(folders[:8])]
    proc = start([sys.executable, "-m", "cpet.cli", "serve", "--backbone", str(cdir), *named, "--port", str(port),
                  "--task-root", str(folders[0].parent)], port)
    counts = {"sent": 0, "ok": 0, "not_loaded": 0, "5xx": 0, "other": 0, "lost": 0, "reloads": 0}

    async def run() -> None:
        rng = random.Random(2)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                     limits=httpx.Limits(max_connections=256)) as client:
            stop = time.perf_counter() + seconds

            async def one(i: int):
                task = f"t{rng.randrange(8):02d}"
                try:
                    r = await client.post("/v1/classify", json={"task": task, "input": SENTENCES[i % len(SENTENCES)]})
                    key = "ok" if r.status_code == 200 else "not_loaded" if r.status_code == 404 else \
                        "5xx" if r.status_code >= 500 else "other"
                    counts[key] += 1
                except httpx.HTTPError:
                    counts["lost"] += 1

            async def churn():
                k = 0
                while time.perf_counter() < stop:
                    await asyncio.sleep(2)
                    name = f"t{1 + k % 7:02d}"
                    await client.post("/v1/tasks/unload", json={"name": name})
                    await asyncio.sleep(0.2)
                    r = await client.post("/v1/tasks/load", json={"name": name, "path": str(folders[1 + k % 7])})
                    counts["reloads"] += r.status_code == 200
                    k += 1

            pending, i = [asyncio.create_task(churn())], 0
            while time.perf_counter() < stop:
                await asyncio.sleep(rng.expovariate(rate))
                pending.append(asyncio.create_task(one(i)))
                counts["sent"] += 1
                i += 1
            await asyncio.gather(*pending)
    try:
        asyncio.run(run())
        counts["rss_mb"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return {"seconds": seconds, "rate": rate, **counts}


def table(records: list[dict]) -> str:
    head = ["tasks", "popularity", "server", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "RSS MB",
            "task MB", "bank MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        lines.append("| " + " | ".join(str(x) for x in (
            r["tasks"], r["popularity"], r["server"], r["req_per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
            r["errors"], r["rss_mb"], round((r["task_bytes"] or 0) / 2**20, 1),
            round((r["bank_bytes"] or 0) / 2**20, 1))) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-server":
        naive_server(sys.argv[2], sys.argv[4:], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s (0 = 70%% of one task's capacity)")
    ap.add_argument("--max-seconds", type=float, default=60)
    ap.add_argument("--plan", default="UP+Q")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--work", default=None, help="where backbone and task folders go (default: a temp folder)")
    ap.add_argument("--soak", type=float, default=300, help="seconds of load with hot unload / load (0 = skip)")
    args = ap.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="cpet-bench-serve-"))
    cdir, folders, pet_dir = make_tasks(root, 32, args.plan)
    print("fused path latency ...", flush=True)
    paths = path_latency(cdir, folders[0], pet_dir, args.repeats)
    ratio = statistics.fmean(v["clm_cpet_fused"] / v["clm_pet"] for v in paths.values())
    rate = args.rate or round(0.7 * capacity(cdir, folders[0]), 1)
    print(f"open-loop rate {rate} req/s", flush=True)
    records = []
    for n in (1, 8, 32):
        for pop in (("uniform",) if n == 1 else ("uniform", "zipf", "distinct")):
            for server in (("cpet",) if n == 1 else ("cpet", "naive")):
                rec = run_one(server, cdir, folders[:n], pop, args.requests, rate, args.max_seconds)
                print(json.dumps(rec), flush=True)
                records.append(rec)
    soaked = soak(cdir, folders, args.soak, rate) if args.soak else None
    if soaked:
        print(json.dumps(soaked), flush=True)
    single = next(r for r in records if r["tasks"] == 1)
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "plan": args.plan, "rate": rate,
           "requests": args.requests}
    OUT.mkdir(exist_ok=True)
    (OUT / "serve.json").write_text(json.dumps({"records": records, "cpet_vs_clm_pet_latency": round(ratio, 3),
                                                "path_latency_ms": paths, "soak": soaked, "env": env}, indent=1))
    mixed = [r for r in records if r["tasks"] == 32 and r["server"] == "cpet"]
    text = (f"# Serving many tasks from one compressed MiniLM ({args.plan})\n\n"
            f"Measured {env['date']} on {env['cpu']}, torch {env['torch']}, {env['threads']} threads; "
            f"open-loop Poisson load at {rate} req/s (70% of one task's closed-loop capacity), "
            f"{args.requests} single-sentence requests per run, loopback HTTP. Tasks: same-shape random "
            "CLM+CPET modules (LoRA r8 q,v + recovery r32 on every linear + head).\n\n" + table(records) + "\n\n"
            "32 tasks mixed vs one task: " + ", ".join(
                f"{r['popularity']} {r['req_per_s'] / single['req_per_s']:.2f}x" for r in mixed) + " of the "
            "single-task throughput.\n\n"
            "Fused add-on path (one down/up pair per layer), in-process median latency (ms) on the same "
            "batches; CLM+PET = LoRA on q,v only:\n\n| batch | CLM+PET | CLM+CPET fused | CLM+CPET unfused |\n"
            "|---|---|---|---|\n" + "\n".join(f"| {k} | {v['clm_pet']} | {v['clm_cpet_fused']} | "
                                             f"{v['clm_cpet_unfused']} |" for k, v in paths.items())
            + f"\n\nCLM+CPET / CLM+PET latency (fused): {ratio:.2f}x (target <= 1.10x).\n"
            + (f"\nSoak: {soaked['seconds']:.0f} s at {rate} req/s on 8 tasks, one task unloaded and reloaded every "
               f"2 s ({soaked['reloads']} reloads): {soaked['sent']} requests, {soaked['ok']} answered 200, "
               f"{soaked['not_loaded']} 404 (task away), {soaked['5xx']} 5xx, {soaked['other']} other, "
               f"{soaked['lost']} lost; server RSS after {soaked['rss_mb']} MB.\n" if soaked else ""))
    (OUT / "serve.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
