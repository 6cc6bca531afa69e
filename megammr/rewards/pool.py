"""Verifier processes with a hard time limit per verification.

Why processes and not threads: math-verify's own timeout is signal.alarm (main thread only),
and sympy can spin in C-level big-integer arithmetic that no Python-level timer interrupts.
Only killing the process bounds the time. Each worker gets one task at a time over its own
pipe, so the parent always knows which task a worker holds and since when; past the deadline
the worker is SIGKILLed, the task scores 0 with status "timeout", and a fresh worker is started
in the background while the other workers keep going. A worker that dies mid-task (segfault,
OOM under its address-space limit) gives status "crash" the same way.

Workers are fresh interpreters (`python -m megammr.rewards._worker`), not forks: the trainer
process may hold CUDA contexts and threads that must not be forked, and multiprocessing's
"spawn" re-imports the parent's __main__, which breaks under stdin scripts and notebooks.
Messages are pickled over the child's stdin/stdout pipes. A new worker only receives work
after it reports ready, so its start-up (imports, warm-up: about a second) never counts
against a task's time limit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Optional, Sequence

from megammr.config import RewardConfig
from megammr.rewards import core
from megammr.rewards.core import RewardItem, RewardResult, Weights

# lazy in this module: megammr.runtime (stop_signals_blocked in _start), which imports torch. The
# verifier processes import this module (worker_main) and must start without torch.

log = logging.getLogger(__name__)

_STARTUP_LIMIT_S = 120.0  # a worker that cannot import math-verify in this long means a broken environment


def worker_main(conn_in, conn_out, weights: Weights, memory_mb: int):
    """Verifier process: import and warm up, say ready, then score items until told to stop."""
    # Ctrl-C and the stop signals (runtime.STOP_SIGNALS; Slurm sends them to every process of a step)
    # are the trainer's to handle; a worker ends when its pipe closes or is killed (SIGKILL) on a
    # timeout. Named here, not imported: megammr.runtime imports torch, which a worker never needs.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if memory_mb > 0:
        try:  # lazy: resource is Unix-only
            import resource
            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    core.ensure_ready()
    conn_out.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn_in.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, item = msg
        try:
            res = core.score_item(item, weights)
        except MemoryError:
            res = RewardResult(status="error", error="MemoryError")
        except Exception as e:  # a verifier bug must cost one sample, not the run
            res = RewardResult(status="error", error=f"{type(e).__name__}: {str(e)[:200]}")
        try:
            conn_out.send((task_id, res))
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection          # parent -> child (child's stdin)
    rconn: Connection         # child -> parent (child's stdout)
    started: float
    ready: bool = False
    task: Optional[int] = None
    sent_at: float = 0.0


@dataclass
class PoolStats:
    verifications: int = 0
    timeouts: int = 0
    crashes: int = 0
    errors: int = 0
    restarts: int = 0
    latencies_s: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "latencies_s"}


class RewardPool:
    """`score(items) -> results` in input order, each verification under `timeout_s`.

    Usage: `with RewardPool(recipe.reward) as pool: results = pool.score(items)`.
    Keep one pool for a whole run: starting workers costs about a second each.
    """

    def __init__(self, cfg=None, *, workers: Optional[int] = None, timeout_s: Optional[float] = None):
        if cfg is None:
            cfg = RewardConfig()
        self.weights = Weights.from_config(cfg)
        self.n_workers = int(workers if workers is not None else cfg.workers)
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg.timeout_s)
        if self.n_workers < 1 or self.timeout_s <= 0:
            raise ValueError(f"RewardPool needs workers >= 1 and timeout_s > 0, got {self.n_workers}, {self.timeout_s}")
        self.memory_mb = int(cfg.worker_memory_mb)
        self.stats = PoolStats()
        self._workers: list[_Worker] = [self._start() for _ in range(self.n_workers)]
        self._closed = False

    # ------------------------------------------------------------------ workers
    def _start(self) -> _Worker:
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=pkg_root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        args = json.dumps({"weights": dataclasses.asdict(self.weights), "memory_mb": self.memory_mb})
        from megammr.runtime import stop_signals_blocked
        with stop_signals_blocked():  # from its first instruction, not only once worker_main runs
            proc = subprocess.Popen([sys.executable, "-m", "megammr.rewards._worker", args], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        # Connection objects own duplicated fds; the Popen file objects are closed right away.
        conn = Connection(os.dup(proc.stdin.fileno()), readable=False)
        rconn = Connection(os.dup(proc.stdout.fileno()), writable=False)
        proc.stdin.close()
        proc.stdout.close()
        return _Worker(proc, conn, rconn, time.monotonic())

    def _replace(self, i: int):
        w = self._workers[i]
        self._kill(w)
        self.stats.restarts += 1
        self._workers[i] = self._start()

    @staticmethod
    def _kill(w: _Worker):
        try:
            w.proc.kill()
        except Exception:
            pass
        try:
            w.proc.wait(timeout=5)
        except Exception:
            pass
        for c in (w.conn, w.rconn):
            try:
                c.close()
            except Exception:
                pass

    def wait_ready(self, timeout: float = _STARTUP_LIMIT_S):
        """Block until every worker has started (optional: `score` waits by itself)."""
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self._workers):
            if time.monotonic() > deadline:
                raise RuntimeError("reward workers did not start")
            self._poll(0.05, {}, [])

    # ------------------------------------------------------------------ scoring
    def score(self, items: Sequence[RewardItem]) -> list[RewardResult]:
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        results: list[Optional[RewardResult]] = [None] * len(items)
        pending = deque(range(len(items)))
        done = 0
        while done < len(items):
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    tid = pending.popleft()
                    try:
                        w.conn.send((tid, items[tid]))
                        w.task, w.sent_at = tid, time.monotonic()
                    except (BrokenPipeError, OSError):
                        pending.appendleft(tid)  # the worker died idle: nothing lost but the worker
                        w.ready = False
            done += self._poll(self._next_wakeup(), results, items)
        return results  # type: ignore[return-value]

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        deadlines = [w.sent_at + self.timeout_s - now for w in self._workers if w.task is not None]
        return max(0.0, min(deadlines)) + 0.001 if deadlines else 0.25

    def _finish(self, results, i: int, res: RewardResult) -> int:
        w = self._workers[i]
        res.latency_s = time.monotonic() - w.sent_at
        results[w.task] = res
        self.stats.verifications += 1
        self.stats.latencies_s.append(res.latency_s)
        if res.status == "error":
            self.stats.errors += 1
            log.debug("verification error: %s", res.error)
        w.task = None
        return 1

    def _poll(self, timeout: float, results, items) -> int:
        """Wait for messages or deaths up to `timeout`; handle them and any expired deadline.
        Returns how many tasks finished."""
        finished = 0
        handles = {w.rconn: (i, w) for i, w in enumerate(self._workers)}
        for h in wait(list(handles), timeout=timeout):
            i, w = handles[h]
            if self._workers[i] is not w:
                continue
            try:
                msg = w.rconn.recv()
            except (EOFError, OSError):
                msg = None  # EOF: the process died (its end of the pipe closed)
            if msg is None:
                finished += self._on_death(i, results)
            elif msg[0] == "ready":
                w.ready = True
            elif w.task is not None and msg[0] == w.task:
                finished += self._finish(results, i, msg[1])
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.task is not None and now - w.sent_at > self.timeout_s:
                self.stats.timeouts += 1
                finished += self._finish(results, i, RewardResult(status="timeout"))
                log.warning("verification exceeded %.1fs; worker killed and restarted", self.timeout_s)
                self._replace(i)
            elif not w.ready and now - w.started > _STARTUP_LIMIT_S:
                raise RuntimeError(f"reward worker did not start within {_STARTUP_LIMIT_S:.0f}s "
                                   f"(exit code {w.proc.poll()}); is math-verify installed?")
        return finished

    def _on_death(self, i: int, results) -> int:
        w = self._workers[i]
        try:
            code = w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if not w.ready and w.task is None and self.stats.restarts > 10 * self.n_workers + 10:
            raise RuntimeError(f"reward workers keep dying at start-up (exit code {code})")
        n = 0
        if w.task is not None:
            self.stats.crashes += 1
            n = self._finish(results, i, RewardResult(status="crash", error=f"exit code {code}"))
            log.warning("verifier process died mid-task (exit code %s); restarted", code)
        self._replace(i)
        return n

    # ------------------------------------------------------------------ lifecycle
    def close(self):
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                if w.task is None:
                    w.conn.send(None)
            except Exception:
                pass
        for w in self._workers:
            if w.ready:  # a worker still importing would only read the stop message later
                try:
                    w.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            self._kill(w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def latency_percentile(latencies: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a list of seconds; 0 for an empty list."""
    if not latencies:
        return 0.0
    xs = sorted(latencies)
    k = min(len(xs) - 1, max(0, int(round(q / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]

