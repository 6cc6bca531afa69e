"""TRL's GRPOTrainer and the transformers-side figures of `megammr bench step`, in a fresh
interpreter (`python -m megammr.bench.yardstick --worker SPEC RESULT`), so neither framework's
imports or global state (megammr's CPU compatibility layer) touch the other.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from megammr.bench.compute import compat_mode_active, compute_params, hf_compute, median
from megammr.bench.machine import loadavg


def run_worker(args, recipe, prompts: list[dict], batches, work: str, *, trl: bool, hf: bool) -> dict:
    """HF compute and/or TRL's GRPOTrainer in a fresh interpreter (see _worker)."""
    import dataclasses

    import torch

    from megammr.rewards.core import Weights
    spec = {
        "threads": torch.get_num_threads(), "trl": trl, "hf": hf, "compute": compute_params(recipe),
        "model": recipe.model.hf_path, "out": work, "prompts": prompts,
        "n": recipe.rollout.n, "max_new_tokens": recipe.rollout.max_new_tokens,
        "temperature": recipe.rollout.temperature, "per_step": recipe.train.prompts_per_step,
        "micro_batch_size": recipe.train.micro_batch_size, "steps": args.warmup + args.steps, "warmup": args.warmup,
        "beta": recipe.algo.kl_coef, "epsilon": recipe.algo.clip_low, "epsilon_high": recipe.algo.clip_high,
        "lr": recipe.optim.lr, "max_grad_norm": recipe.optim.clip_grad, "seed": recipe.train.seed,
        "weight_decay": recipe.optim.weight_decay,
        "reward": dataclasses.asdict(Weights.from_config(recipe.reward)),
    }
    os.makedirs(work, exist_ok=True)
    spec_path, result_path = os.path.join(work, "spec.json"), os.path.join(work, "result.json")
    batches_path = os.path.join(work, "micro_batches.pt")
    spec["batches"] = batches_path
    torch.save(batches, batches_path)
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + \
        os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    log_path = os.path.join(work, "worker.log")
    load_before = loadavg()
    with open(log_path, "w") as logf:
        try:
            p = subprocess.run([sys.executable, "-m", "megammr.bench.yardstick", "--worker", spec_path, result_path],
                               stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.worker_timeout} s (log: {log_path})"}
    if p.returncode != 0 or not os.path.isfile(result_path):
        with open(log_path) as f:
            tail = f.read()[-3000:]
        return {"error": f"exit code {p.returncode} (log: {log_path})", "log_tail": tail}
    with open(result_path) as f:
        res = json.load(f)
    if res.get("trl"):
        res["trl"]["loadavg"] = [load_before, loadavg()]
    return res


def _worker(spec_path: str, result_path: str) -> int:
    import torch
    with open(spec_path) as f:
        s = json.load(f)
    torch.set_num_threads(s["threads"])
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "compat_mode": compat_mode_active()}
    if s["hf"]:
        out["hf"] = hf_compute(s["compute"], torch.load(s["batches"]))
        out["engine"] = _engine_generate(s)
    if s["trl"]:
        out["trl"] = _run_trl(s)
    with open(result_path, "w") as f:
        json.dump(out, f, default=str)
    return 0


def _engine_generate(s: dict) -> dict:
    """megammr's rollout engine on the measured steps' prompts, in this clean process (no CPU mode)."""
    from megammr.rollout.base import RolloutPrompt, SamplingParams
    from megammr.rollout.hf_engine import TransformersEngine

    per = s["per_step"]
    engine = TransformersEngine.from_pretrained(s["model"], max_batch_sequences=per * s["n"])
    sp = SamplingParams(temperature=s["temperature"], top_p=1.0, top_k=-1, max_new_tokens=s["max_new_tokens"],
                        seed=s["seed"])
    steps = [[RolloutPrompt(p["text"]) for p in s["prompts"][i * per:(i + 1) * per]]
             for i in range(s["warmup"], s["steps"])]
    engine.generate(steps[0], s["n"], sp)  # warm-up
    rows = []
    for i, prompts in enumerate(steps):
        t0 = time.perf_counter()
        ros = engine.generate(prompts, s["n"], sp)
        rows.append({"index": i, "generate_s": time.perf_counter() - t0,
                     "generated_tokens": sum(len(r.token_ids) for r in ros)})
    return {"what": "megammr's TransformersEngine.generate outside the trainer (no CPU compatibility mode)",
            "steps": rows, "median": {k: median(r[k] for r in rows) for k in ("generate_s", "generated_tokens")}}


def _run_trl(s: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megammr.models.processor import load_processor
    from megammr.rewards.core import RewardItem, Weights, score_item

    w = Weights(**s["reward"])
    per_step_completions = s["per_step"] * s["n"]
    if per_step_completions % s["micro_batch_size"]:
        raise SystemExit("prompts x n must be a multiple of the micro-batch size")
    rec: dict[str, Any] = {"generate_s": [], "reward_s": [], "generated_tokens": [], "unique_prompts": [],
                           "step_end": []}

    def megammr_reward(prompts, completions, completion_ids, answer, choices, **kw):
        t0 = time.perf_counter()
        out = [score_item(RewardItem(c, a, json.loads(ch)), w).reward for c, a, ch in zip(completions, answer, choices)]
        rec["reward_s"].append(time.perf_counter() - t0)
        rec["generated_tokens"].append(sum(len(ids) for ids in completion_ids))
        rec["unique_prompts"].append(len(set(prompts)))
        return out

    class StepTimes(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            rec["train_begin"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            rec["step_end"].append(time.perf_counter())

    torch.manual_seed(s["seed"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(s["model"], dtype=torch.float32)
    orig_generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = orig_generate(*a, **kw)
        rec["generate_s"].append(time.perf_counter() - t0)
        return out

    model.generate = timed_generate
    ds = Dataset.from_list([{"prompt": p["text"], "answer": p["answer"], "choices": json.dumps(p["choices"])}
                            for p in s["prompts"]])
    cfg = GRPOConfig(
        output_dir=os.path.join(s["out"], "trl-run"), max_steps=s["steps"], seed=s["seed"], data_seed=s["seed"],
        per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=per_step_completions // s["micro_batch_size"],
        num_generations=s["n"], max_completion_length=s["max_new_tokens"], temperature=s["temperature"],
        top_p=1.0, top_k=0, repetition_penalty=1.0, beta=s["beta"], epsilon=s["epsilon"],
        epsilon_high=s["epsilon_high"], loss_type="dapo", scale_rewards="group", num_iterations=1,
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"], optim="adamw_torch", shuffle_dataset=False,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False, remove_unused_columns=False,
    )
    processor = load_processor(s["model"])
    trainer = GRPOTrainer(model=model, reward_funcs=[megammr_reward], args=cfg, train_dataset=ds,
                          processing_class=processor, callbacks=[StepTimes()])
    trainer.train()
    ends = rec["step_end"]
    walls = [b - a for a, b in zip([rec["train_begin"]] + ends[:-1], ends)]
    tok = processor.tokenizer

    def at(key, i):
        return rec[key][i] if i < len(rec[key]) else None

    steps = []
    for i, wall in enumerate(walls):
        texts = [p["text"] for p in s["prompts"][i * s["per_step"]:(i + 1) * s["per_step"]]]
        steps.append({"step": i + 1, "wall_s": wall, "generate_s": at("generate_s", i), "reward_s": at("reward_s", i),
                      "generated_tokens": at("generated_tokens", i), "unique_prompts": at("unique_prompts", i),
                      "prompt_tokens": sum(len(x) for x in tok(texts)["input_ids"]) * s["n"]})
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
            "steps_per_generation", "num_generations", "max_completion_length", "temperature", "top_p", "top_k",
            "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards", "learning_rate", "max_grad_norm",
            "optim", "gradient_checkpointing", "bf16", "use_cpu", "shuffle_dataset")
    return {"steps": steps, "generate_calls": len(rec["generate_s"]),
            "config": {k: str(getattr(cfg, k)) if k == "optim" else getattr(cfg, k) for k in keys}}


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        raise SystemExit("usage: python -m megammr.bench.yardstick --worker SPEC.json RESULT.json "
                         "(started by `megammr bench step`)")
    sys.exit(_worker(sys.argv[2], sys.argv[3]))
