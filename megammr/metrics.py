"""Step metrics: one JSON line per step in OUTPUT_DIR/metrics.jsonl, TensorBoard events in
OUTPUT_DIR/tensorboard (when the optional tensorboard package is installed) and a one-line summary
on stdout.

Written by global rank 0 only; the trainer reduces the numbers over ranks before they get here.
Keys are documented in the README ("Metrics").
"""
from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsLog:
    def __init__(self, output_dir: str, enabled: bool, total_steps: int, log_interval: int = 1,
                 resume_after: int = 0):
        self.enabled, self.total, self.interval = enabled, total_steps, max(1, log_interval)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._f = self._tb = None
        self.t0 = time.perf_counter()
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            kept = []
            if resume_after and os.path.exists(self.path):
                # Resuming: keep the lines up to the checkpoint's step; later ones are rerun.
                with open(self.path, encoding="utf-8") as f:
                    kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_after]
            self._f = open(self.path, "w", encoding="utf-8")
            self._f.writelines(kept)
            self._tb = _tensorboard(os.path.join(output_dir, "tensorboard"), resume_after)

    def log(self, m: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and v is not None:
                    self._tb.add_scalar(k, v, m["step"])
            self._tb.flush()
        step = m["step"]
        if step % self.interval == 0 or step == self.total:
            print(summary(m, self.total, time.perf_counter() - self.t0), file=sys.stdout, flush=True)

    def close(self):
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard(log_dir: str, resume_after: int):
    """A TensorBoard writer when the optional `tensorboard` package is installed, else None.
    purge_step drops events of steps a resumed run computes again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir, purge_step=resume_after + 1 if resume_after else None)


def summary(m: dict, total: int, elapsed: float) -> str:
    step = m["step"]
    eta = elapsed / step * (total - step) if step else 0.0
    skipped = "  SKIPPED (non-finite)" if m.get("step_skipped") else ""
    if m.get("groups/dropped"):
        skipped += f"  ({m['groups/dropped']} uniform-reward groups dropped)"
    return (f"step {step}/{total} | reward {m['reward/mean']:.3f} acc {m['reward/accuracy']:.3f} "
            f"fmt {m['reward/format']:.3f} | len {m['response/length_mean']:.1f} | loss {m['loss']:.4g} "
            f"gnorm {m['grad_norm']:.3g} kl {m['kl']:.2e} | {m['time/step']:.1f} s/step, eta {eta:.0f} s{skipped}")
