"""The HTTP face of the engine (FastAPI, thin): every route parses, calls the engine, answers.

    GET  /health               GET /v1/tasks              GET /metrics (Prometheus text)
    POST /v1/classify          {"task": "sst2" | [...], "input": "..." | [...] | [["premise", "hypothesis"], ...]}
    POST /v1/extract           {"task", "question", "context"} (SQuAD-style span tasks)
    POST /v1/generate          {"task", "input"} (text-to-text tasks on a decoder LM)
    POST /v1/tasks/load        {"name", "path", "pin"}      POST /v1/tasks/unload {"name"}

Bad input is never a 5xx: an unknown task is 404 naming the loaded ones, a malformed body 422, a task
folder outside --task-root 403, a damaged or mismatched folder 400 (everything else keeps serving).
"""

from __future__ import annotations

import asyncio
import time
from typing import Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from cpet.errors import CpetError
from cpet.predict import Item
from cpet.serve.engine import Engine, Forbidden, UnknownTask

Text = Union[str, tuple[str, str]]


class ClassifyRequest(BaseModel):
    task: Union[str, list[str]] = Field(description="a loaded task, or several (each input goes to each)")
    input: Union[str, list[Text], tuple[str, str]] = Field(
        description="a text, a list of texts, or [text_a, text_b] pairs for pair tasks")


class ExtractRequest(BaseModel):
    task: str
    question: Union[str, list[str]]
    context: Union[str, list[str]]


class GenerateRequest(BaseModel):
    task: str
    input: Union[str, list[str]]
    max_tokens: int = Field(default=32, ge=1, le=512)


class LoadRequest(BaseModel):
    name: str = Field(min_length=1)
    path: str
    pin: bool = False
    task: str | None = Field(default=None, description="for a PEFT adapter: the cpet task it solves (e.g. sst2)")


class UnloadRequest(BaseModel):
    name: str


def _inputs(value) -> list[tuple[str, str | None]]:
    if isinstance(value, str):
        return [(value, None)]
    if isinstance(value, tuple):  # one pair
        return [(value[0], value[1])]
    return [(v, None) if isinstance(v, str) else (v[0], v[1]) for v in value]


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="cpet", description="Many tasks served from one shared compressed backbone.")
    reg = CollectorRegistry()
    requests = Counter("cpet_requests", "requests by route and task", ["route", "task"], registry=reg)
    errors = Counter("cpet_errors", "error answers by route and status", ["route", "status"], registry=reg)
    latency = Histogram("cpet_request_seconds", "request latency by route and task", ["route", "task"], registry=reg,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    batch_rows = Histogram("cpet_batch_rows", "rows per model batch", registry=reg, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    batch_tasks = Histogram("cpet_batch_tasks", "distinct tasks per model batch", registry=reg,
                            buckets=(1, 2, 4, 8, 16, 32))
    loaded = Gauge("cpet_tasks_loaded", "tasks loaded", registry=reg)
    task_bytes = Gauge("cpet_task_bytes", "bytes of the loaded tasks' modules", registry=reg)

    def on_batch(rows: int, counts: dict[str, int]) -> None:
        batch_rows.observe(rows)
        batch_tasks.observe(len(counts))

    engine.on_batch = on_batch
    app.state.engine = engine

    def fail(route: str, status: int, message: str):
        errors.labels(route, str(status)).inc()
        raise HTTPException(status_code=status, detail=message)

    async def wait(route: str, fut):
        try:
            return await asyncio.wrap_future(fut)
        except UnknownTask as e:
            fail(route, 404, str(e))
        except CpetError as e:
            fail(route, 400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.get("/health")
    def health():
        return {"status": "ok", "tasks": len(engine.bank.tasks)}

    @app.get("/v1/tasks")
    def tasks():
        return {"backbone": engine.bank.fingerprint, "task_bytes": engine.bank.task_bytes,
                "bank_bytes": engine.bank.bank_bytes, "tasks": engine.describe()}

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        t0 = time.perf_counter()
        names = [req.task] if isinstance(req.task, str) else list(req.task)
        inputs = _inputs(req.input)
        if not names or not inputs:
            fail("classify", 422, "give at least one task and one input")
        unknown = sorted({n for n in names if n not in engine.bank.tasks})
        if unknown:
            fail("classify", 404, f"task(s) {unknown} not loaded (loaded: {sorted(engine.bank.tasks)})")
        heads = [n for n in names if engine.bank.tasks[n].head_type != "lm"]
        texts = [n for n in names if engine.bank.tasks[n].head_type == "lm"]  # text-to-text: verbalizers
        futs = []
        try:
            if heads:
                futs.append(engine.classify(heads, inputs))
            futs += [engine.by_format(n, [Item(a, b) for a, b in inputs], "classify") for n in texts]
        except UnknownTask as e:
            fail("classify", 404, str(e))
        except CpetError as e:
            fail("classify", 400, str(e))
        got = {}
        outs = [await wait("classify", f) for f in futs]
        if heads:
            got.update({(r["input"], r["task"]): r for r in outs.pop(0)})
        for n, out in zip(texts, outs):
            got.update({(i, n): {"input": i, "task": n, **out[(i, n)]} for i in range(len(inputs))})
        results = [got[(i, n)] for i in range(len(inputs)) for n in names]
        dt = time.perf_counter() - t0
        for n in names:
            requests.labels("classify", n).inc()
            latency.labels("classify", n).observe(dt)
        return {"results": results}

    async def by_format(route: str, task: str, items: list[Item], max_new_tokens: int | None = None):
        t0 = time.perf_counter()
        try:
            fut = engine.by_format(task, items, route, max_new_tokens)
        except UnknownTask as e:
            fail(route, 404, str(e))
        except CpetError as e:
            fail(route, 400, str(e))
        out = await wait(route, fut)
        requests.labels(route, task).inc()
        latency.labels(route, task).observe(time.perf_counter() - t0)
        return {"results": [{"input": i, "task": task, **out[(i, task)]} for i in range(len(items))]}

    @app.post("/v1/extract")
    async def extract(req: ExtractRequest):
        qs = [req.question] if isinstance(req.question, str) else req.question
        cs = [req.context] if isinstance(req.context, str) else req.context
        if len(qs) != len(cs) or not qs:
            fail("extract", 422, "give as many contexts as questions (at least one)")
        return await by_format("extract", req.task, [Item(q, c) for q, c in zip(qs, cs)])

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest):
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            fail("generate", 422, "give at least one input")
        return await by_format("generate", req.task, [Item(t) for t in texts], req.max_tokens)

    @app.post("/v1/tasks/load")
    async def load(req: LoadRequest):
        try:
            fut = engine.load(req.name, req.path, req.pin, req.task)
        except Forbidden as e:
            fail("load", 403, str(e))
        return await wait("load", fut)

    @app.post("/v1/tasks/unload")
    async def unload(req: UnloadRequest):
        try:
            fut = engine.unload(req.name)
        except UnknownTask as e:
            fail("unload", 404, str(e))
        return await wait("unload", fut)

    @app.get("/metrics")
    def metrics():
        loaded.set(len(engine.bank.tasks))
        task_bytes.set(engine.bank.task_bytes)
        return PlainTextResponse(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    return app
