"""Step metrics: one JSON line per step in OUTPUT_DIR/metrics.jsonl, TensorBoard events in
OUTPUT_DIR/tensorboard (when the optional tensorboard package is installed), Weights & Biases
(train.wandb_project, optional) and what a user watches on stdout: a progress bar per phase on a
terminal, a plain line every train.log_interval steps elsewhere (Slurm logs, CI).

A sink: it writes the rows it is given and computes none. Written by global rank 0 only; the
rows are reduced over ranks before they get here (megammr.train.report). Keys are documented in
the README ("Metrics").
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from typing import Optional

from tqdm import tqdm

from megammr.config import RecipeError

# lazy in this module: the optional sinks, TensorBoard (torch.utils.tensorboard needs the
# tensorboard package) and wandb, imported only when a run uses them.


class MetricsLog:
    def __init__(self, output_dir: str, enabled: bool, total_steps: int, log_interval: int, *,
                 progress: str, resume_after: int = 0, desc: str = "train", wandb: Optional[dict] = None):
        """`log_interval`, `progress`: train.log_interval and train.progress (defaults in config.py).
        `wandb`: None (off) or wandb.init arguments (project, name, config, ...), see `_wandb`."""
        self.enabled, self.total = enabled, total_steps
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._f = self._tb = self._wandb = self.progress = None
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
            if wandb is not None:
                self._wandb = _wandb(output_dir, **wandb)
            self.progress = Progress(total_steps, resume_after, interval=log_interval, mode=progress, desc=desc)

    def log(self, m: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        scalars = {k: v for k, v in clean.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and v is not None}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, m["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=m["step"])
        self.progress.update(m)

    def close(self):
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _tensorboard(log_dir: str, resume_after: int):
    """A TensorBoard writer when the optional `tensorboard` package is installed, else None.
    purge_step drops events of steps a resumed run computes again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir, purge_step=resume_after + 1 if resume_after else None)


def wandb_missing_message() -> Optional[str]:
    """Why W&B logging cannot start, or None when the package is importable (checked before a run starts)."""
    if importlib.util.find_spec("wandb") is None:
        return ("train.wandb_project is set but the wandb package is not installed: pip install wandb "
                "(or pip install -e '.[wandb]'), or remove train.wandb_project")
    return None


def _wandb(output_dir: str, project: str, name: str, config: dict, group: Optional[str] = None):
    """A W&B run for this phase, imported only here. Its id is derived from the output directory, so a
    resumed phase continues the same run (W&B ignores the re-logged steps after the checkpoint).
    `name`, `group`, `config`: see megammr.train.report.wandb_args."""
    try:
        import wandb
    except ImportError as e:  # a recipe problem (exit code 2), like the up-front check
        raise RecipeError(wandb_missing_message() or f"train.wandb_project: importing wandb failed ({e})") from None
    run_id = hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:16]
    return wandb.init(project=project, name=name, group=group, config=config, dir=output_dir, id=run_id,
                      resume="allow")


class Progress:
    """Rank 0's view of a phase. A tqdm bar (step, reward, accuracy, format rate, s/step, ETA) when
    stdout is a terminal or mode="bar"; otherwise one plain line every `interval` steps and at the
    last one, with the same fields plus loss, grad norm and KL, so that logs stay readable.
    `done_before`: steps finished by an earlier run of this phase (resume); rates and the ETA count
    only this run's steps."""

    def __init__(self, total: int, done_before: int = 0, *, interval: int, mode: str, desc: str = "train",
                 file=None):
        self.total, self.done_before, self.interval = total, done_before, max(1, interval)
        self.file = file or sys.stdout
        self.t0 = time.perf_counter()
        self.bar = None
        if mode == "bar" or (mode == "auto" and _is_tty(self.file)):
            self.bar = tqdm(total=total, initial=done_before, desc=desc, unit="step", file=self.file,
                            dynamic_ncols=True, smoothing=0.3, mininterval=0,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]")

    def eta(self, step: int) -> float:
        done = step - self.done_before
        return (time.perf_counter() - self.t0) / done * (self.total - step) if done > 0 else 0.0

    def update(self, m: dict) -> None:
        step = m["step"]
        if self.bar is not None:
            self.bar.set_postfix_str(_bar_fields(m), refresh=False)
            self.bar.update(step - self.bar.n)
            if step == self.total:
                self.close()  # now: a later close would redraw the rate with the checkpoint and export time in it
        elif step % self.interval == 0 or step == self.total:
            print(summary(m, self.total, self.eta(step)), file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_tty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def _notes(m: dict) -> str:
    out = "  SKIPPED (non-finite)" if m.get("step_skipped") else ""
    if m.get("groups/dropped"):
        out += f"  ({m['groups/dropped']} uniform-reward groups dropped)"
    return out


def _num(v, fmt: str) -> str:
    return "nan" if v is None else format(v, fmt)


def _bar_fields(m: dict) -> str:
    return (f"reward {_num(m['reward/mean'], '.3f')} acc {_num(m['reward/accuracy'], '.3f')} "
            f"fmt {_num(m['reward/format'], '.2f')} len {_num(m['response/length_mean'], '.0f')}{_notes(m)}")


def summary(m: dict, total: int, eta: float) -> str:
    """The plain per-step line (logs that are not a terminal)."""
    return (f"step {m['step']}/{total} | reward {_num(m['reward/mean'], '.3f')} acc {_num(m['reward/accuracy'], '.3f')} "
            f"fmt {_num(m['reward/format'], '.3f')} | len {_num(m['response/length_mean'], '.1f')} | "
            f"loss {_num(m['loss'], '.4g')} gnorm {_num(m['grad_norm'], '.3g')} kl {_num(m['kl'], '.2e')} | "
            f"{m['time/step']:.1f} s/step, eta {_clock(eta)}{_notes(m)}")


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"
