"""The serving engine: one TaskBank, a dynamic batcher across tasks, task lifecycles.

    requests --submit--> queue --worker thread--> batches of <= max_batch rows (waiting <= max_wait_ms
    for more), rows sorted by task -> one backbone forward, per-task segments -> futures resolved

Only the worker thread runs the model, so a batch never meets a half-loaded or half-unloaded task:
loads and unloads are queued jobs too, run between batches. A task in use by queued requests is not
unloaded until they finish (its reference count); an LRU over task bytes evicts the least recently
used unpinned, idle task when ``max_task_bytes`` would be exceeded. A PEFT LoRA folder loads as a task
too: inherited onto the compressed backbone with recovery fitted to its compression error, no task data
(``cpet adapt``). A request's output does not depend on its batch-mates (per-token int8, per-segment
add-ons).
"""

from __future__ import annotations

import ctypes
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cpet.adapt import adapt
from cpet.bank import TaskBank
from cpet.config import RecoveryConfig
from cpet.errors import CpetError
from cpet.formats import pad_rows
from cpet.predict import Item, encode_inputs, label_record, predict_by_format, spec_of


def _trim_heap() -> None:
    """Give freed heap pages back to the OS after a load or unload (glibc; a no-op elsewhere): a task's
    small tensors and its read-in copy would otherwise stay in the process's resident memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class UnknownTask(CpetError):
    """A request names a task that is not loaded (HTTP 404)."""


class Forbidden(CpetError):
    """A task folder outside the allowed root (HTTP 403)."""


@dataclass
class _Rows:
    """One classify request: its (input index, task) pairs, encodings, and the future of its results."""

    pairs: list[tuple[int, str]]
    enc: list[tuple[dict, bool]]  # per input: (token ids, truncated)
    future: Future
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class _Job:
    """Anything else the worker runs between batches (load, unload, a format prediction)."""

    fn: Callable[[], object]
    future: Future
    kind: str = "admin"  # admin (load / unload) | predict (a format prediction: may run while an unload waits)


class Engine:
    def __init__(self, bank: TaskBank, tokenizer, max_length: int = 128, max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_task_bytes: int | None = None, task_root: str | None = None,
                 on_batch: Callable[[int, dict[str, int]], None] | None = None, backbone_dir: str | None = None,
                 adapt_rank: int = 32):
        self.bank, self.tokenizer = bank, tokenizer
        self.max_length, self.max_batch, self.max_wait = max_length, max_batch, max_wait_ms / 1000
        self.max_task_bytes = max_task_bytes
        self.task_root = Path(task_root).resolve() if task_root else None
        self.on_batch = on_batch
        self.backbone_dir, self.adapt_rank = backbone_dir, adapt_rank  # PEFT folders: adapted onto this backbone
        self.q: queue.Queue = queue.Queue()
        self.refs: dict[str, int] = {}  # task -> queued requests using it
        self.lru: OrderedDict[str, None] = OrderedDict((t, None) for t in bank.tasks)
        self.refs_lock = threading.Lock()
        self.closing: set[str] = set()  # tasks being unloaded
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._loop, name="cpet-engine", daemon=True)
        self.worker.start()

    # ------------------------------------------------------------ public API (any thread)
    def classify(self, tasks: list[str], inputs: list[tuple[str, str | None]]) -> Future:
        """Every input on every task: a future of [{input, task, label, probabilities, truncated?}]."""
        self._acquire(tasks)
        try:
            enc = encode_inputs(self.tokenizer, inputs, self.max_length)
            for t in tasks:
                if self.bank.tasks[t].head_type != "classify":
                    raise CpetError(f"task {t!r} is a {self.bank.tasks[t].head_type} task, not a classifier head; "
                                    "use /v1/extract or /v1/generate (text-to-text classifiers: classify_text)")
        except BaseException:
            self._release(tasks)
            raise
        fut: Future = Future()
        self.q.put(_Rows([(i, t) for i in range(len(inputs)) for t in tasks], enc, fut))
        fut.add_done_callback(lambda _: self._release(tasks))
        return fut

    def by_format(self, task: str, items: list[Item], route: str, max_new_tokens: int | None = None) -> Future:
        """Predictions of one task through its format, run by the worker: ``route`` ``extract`` needs an
        extractive-QA task, ``generate`` a text-to-text task on a language model."""
        self._acquire([task])
        loaded = self.bank.tasks[task]
        spec = spec_of(self.bank, task)
        why = None
        if route == "extract" and (spec is None or spec.format != "span"):
            why = "is not an extractive QA (span) task"
        if route == "generate" and loaded.head_type != "lm":
            why = f"is a {loaded.head_type} task on an encoder, not text-to-text on a language model"
        if route == "classify" and (loaded.head_type != "lm" or spec is None or spec.format != "classify"):
            why = "is not a text-to-text classification task"
        if why:
            self._release([task])
            raise CpetError(f"task {task!r} {why}; use {'/v1/classify' if loaded.head_type == 'classify' else 'its route'}")
        fut = self.run(lambda: predict_by_format(self.bank, self.tokenizer, items, list(range(len(items))), task,
                                                 self.max_length, self.max_batch, generate=route == "generate",
                                                 max_new_tokens=max_new_tokens), kind="predict")
        fut.add_done_callback(lambda _: self._release([task]))
        return fut

    def load(self, name: str, path: str, pin: bool = False, task: str | None = None) -> Future:
        p = Path(path).resolve()
        if self.task_root is None:
            raise Forbidden("loading tasks over HTTP is off: start the server with --task-root DIR (folders under "
                            "it may load)")
        if not p.is_relative_to(self.task_root):
            raise Forbidden(f"{path} is outside the task root {self.task_root}; only folders under it load")
        return self.run(lambda: self._load(name, str(p), pin, task))

    def unload(self, name: str) -> Future:
        with self.refs_lock:
            if name not in self.bank.tasks or name in self.closing:
                raise UnknownTask(f"task {name!r} is not loaded (loaded: {sorted(self.bank.tasks)})")
            self.closing.add(name)  # new requests for it are refused; queued ones finish first
        return self.run(lambda: self._unload(name))

    def run(self, fn: Callable[[], object], kind: str = "admin") -> Future:
        fut: Future = Future()
        self.q.put(_Job(fn, fut, kind))
        return fut

    def close(self) -> None:
        self._stop.set()
        self.q.put(None)
        self.worker.join(timeout=10)

    def describe(self) -> list[dict]:
        return [{"name": t.name, "kind": t.head_type, "labels": t.labels, "bytes": t.bytes, "pinned": t.pinned,
                 "in_use": self.refs.get(t.name, 0), "path": t.path,
                 "backbone": (t.backbone or {}).get("fingerprint")} for t in self.bank.tasks.values()]

    # ------------------------------------------------------------ reference counts and LRU
    def _acquire(self, tasks: list[str]) -> None:
        with self.refs_lock:
            unknown = sorted({t for t in tasks if t not in self.bank.tasks or t in self.closing})
            if unknown:
                raise UnknownTask(f"task(s) {unknown} not loaded (loaded: {sorted(self.bank.tasks)})")
            for t in tasks:
                self.refs[t] = self.refs.get(t, 0) + 1
                self.lru[t] = None
                self.lru.move_to_end(t)

    def _release(self, tasks: list[str]) -> None:
        with self.refs_lock:
            for t in tasks:
                self.refs[t] -= 1
                if not self.refs[t]:
                    del self.refs[t]

    def _load(self, name: str, path: str, pin: bool, task: str | None = None) -> dict:
        if name in self.bank.tasks:
            self._wait_idle(name)
        adapted = None
        if (Path(path) / "adapter_config.json").is_file():  # a PEFT LoRA: moved onto this backbone, no data
            if self.backbone_dir is None:
                raise CpetError("a PEFT adapter loads onto a cpet compress folder (start the server with one)")
            adapted = Path(tempfile.mkdtemp(prefix="cpet-adapted-")) / name
            adapt(path, self.backbone_dir, adapted, RecoveryConfig(r=self.adapt_rank, init="fit",
                                                                    activation=self.bank.activation),
                  max_length=self.max_length, log=lambda s: None, task=task)
            path = str(adapted)
        task = self.bank.load(name, path, pin=pin)
        with self.refs_lock:
            self.lru[name] = None
            self.lru.move_to_end(name)
        evicted = self._evict(keep=name)
        if adapted is not None:  # the bank holds copies of its tensors: the temporary folder can go
            shutil.rmtree(adapted.parent, ignore_errors=True)
        _trim_heap()
        return {"name": name, "bytes": task.bytes, "evicted": evicted,
                **({"adapted_from_peft": True} if adapted is not None else {})}

    def _unload(self, name: str) -> dict:
        try:
            self._wait_idle(name)
            self.bank.unload(name)
            _trim_heap()
        finally:
            with self.refs_lock:
                self.lru.pop(name, None)
                self.closing.discard(name)
        return {"name": name, "unloaded": True}

    def _wait_idle(self, name: str) -> None:
        """Run queued batches until no queued request uses ``name`` (in-flight requests finish first)."""
        while self.refs.get(name, 0):
            self._serve_pending()

    def _evict(self, keep: str) -> list[str]:
        if self.max_task_bytes is None:
            return []
        evicted = []
        while self.bank.task_bytes > self.max_task_bytes:
            with self.refs_lock:
                victim = next((t for t in self.lru if t != keep and not self.bank.tasks[t].pinned
                               and not self.refs.get(t)), None)
            if victim is None:
                break  # everything else is pinned or in use: over budget rather than failing requests
            self.bank.unload(victim)
            with self.refs_lock:
                self.lru.pop(victim, None)
            evicted.append(victim)
        return evicted

    # ------------------------------------------------------------ the worker
    def scores(self, tasks: list[str], **batch) -> list[torch.Tensor]:
        """Per row, its task head's output: the bank's fused path (a baseline may override this)."""
        return self.bank.scores(tasks, **batch)

    def _loop(self) -> None:
        while not self._stop.is_set():
            item = self.q.get()
            if item is None:
                break
            self._handle(item)

    def _handle(self, item) -> None:
        if isinstance(item, _Job):
            try:
                item.future.set_result(item.fn())
            except BaseException as e:  # noqa: BLE001 - the caller gets the error
                item.future.set_exception(e)
            return
        batch = [item]
        rows = len(item.pairs)
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_batch:
            try:
                nxt = self.q.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if not isinstance(nxt, _Rows):  # a job or stop: run the batch first, then it
                self._run_rows(batch)
                if nxt is None:
                    self._stop.set()
                    return
                self._handle(nxt)
                return
            batch.append(nxt)
            rows += len(nxt.pairs)
        self._run_rows(batch)

    def _serve_pending(self) -> None:
        """Drain queued classify requests now (used while waiting for a task to become idle)."""
        pending = []
        while True:
            try:
                pending.append(self.q.get_nowait())
            except queue.Empty:
                break
        rows = [p for p in pending if isinstance(p, _Rows)]
        if rows:
            self._run_rows(rows)
        for p in pending:
            if isinstance(p, _Job) and p.kind == "predict":
                self._handle(p)
            elif not isinstance(p, _Rows):
                self.q.put(p)  # admin jobs (and stop) keep their turn after the drained requests
        if not pending:
            time.sleep(0.001)

    def _run_rows(self, reqs: list[_Rows]) -> None:
        """All rows of ``reqs`` in batches of <= max_batch, sorted by task then length; futures resolved."""
        flat = [(r, i, t) for r in reqs for i, t in r.pairs]
        flat.sort(key=lambda x: (x[2], len(x[0].enc[x[1]][0]["input_ids"])))
        results: dict[int, dict[tuple[int, str], dict]] = {id(r): {} for r in reqs}
        failed: dict[int, BaseException] = {}
        for s in range(0, len(flat), self.max_batch):
            chunk = flat[s: s + self.max_batch]
            try:
                batch = pad_rows([r.enc[i][0] for r, i, _ in chunk], self.tokenizer.pad_token_id)
                scores = self.scores([t for _, _, t in chunk], **batch)
            except BaseException as e:  # noqa: BLE001 - every request in the chunk gets the error
                for r, _, _ in chunk:
                    failed[id(r)] = e
                continue
            if self.on_batch:
                counts: dict[str, int] = {}
                for _, _, t in chunk:
                    counts[t] = counts.get(t, 0) + 1
                self.on_batch(len(chunk), counts)
            for (r, i, t), z in zip(chunk, scores):
                results[id(r)][(i, t)] = {"input": i, "task": t,
                                          **label_record(z, self.bank.tasks[t].labels, r.enc[i][1])}
        for r in reqs:
            if id(r) in failed:
                r.future.set_exception(failed[id(r)])
            else:
                r.future.set_result([results[id(r)][p] for p in r.pairs])
