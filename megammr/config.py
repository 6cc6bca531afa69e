"""Typed recipes. The dataclasses below are the ONLY place defaults live.

A recipe is a YAML file under recipes/ that overrides some fields. `extends: base.yaml`
(relative to the file) inherits another recipe: mappings merge key by key, lists and scalars
are replaced. Command-line overrides `section.field=value` are applied last and typed the same
way. An unknown key is an error naming the file, the dotted key and the closest valid key;
a value of the wrong type is an error naming the expected type; rules between fields (the
backbone name, TP/PP against it, ranges) are megammr.config_rules. Every problem of a file and its
overrides is reported in one run, as a compiler does.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from megammr.config_rules import cross_checks


def F(default: Any, help: str):
    """A field with its documentation attached (shown by `megammr config fields`)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(v):
    import copy
    return copy.deepcopy(v)


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    backbone: str = F("tiny", "Name in the backbones table: tiny, qwen2.5-vl-3b, -7b, -32b, -72b.")
    hf_path: Optional[str] = F(None, "HF checkpoint directory (weights, tokenizer, processor). None: random weights, tiny only.")
    layer_spec: Literal["local", "te"] = F("local", "megatron-core layer spec: 'te' (TransformerEngine, GPU, FP8-capable) or 'local' (pure torch, CPU).")
    precision: Literal["fp32", "bf16", "fp8"] = F("bf16", "Training precision. fp8 needs layer_spec=te and a GPU; weights stay bf16.")
    fp8_recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise"] = F("tensorwise", "TransformerEngine FP8 scaling recipe (precision=fp8 only).")
    freeze_vision: bool = F(False, "Keep the vision tower and patch merger frozen during RL.")
    recompute: Optional[Literal["full", "selective"]] = F(None, "Activation recomputation granularity; None keeps all activations.")


@dataclass
class ParallelConfig:
    tp: int = F(1, "Tensor-parallel size of the language decoder.")
    pp: int = F(1, "Pipeline-parallel size of the language decoder.")
    cp: int = F(1, "Context-parallel size (optional; 1 disables).")
    sequence_parallel: bool = F(False, "Megatron sequence parallelism (needs tp > 1 and TE or apex norms).")
    dist_timeout_s: float = F(600.0, "torch.distributed timeout in seconds: a rank that waits longer than this for the others in a collective fails instead of hanging.")
    # dp is derived: world_size // (tp * pp * cp); see Recipe.data_parallel_size.


@dataclass
class DatasetConfig:
    path: str = F("", "Directory of webdataset shards with energon metadata (.nv-meta).")
    weight: float = F(1.0, "Relative sampling weight when several datasets are blended in one phase.")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = F([], "Shard directories of this phase (weighted blend when more than one).")
    prompt_style: Literal["text", "caption", "image"] = F("text", "text: phase 1, no image; caption: image plus its caption (phase 2); image: caption-free (phase 3).")
    system_prompt: Optional[str] = F(None, "System prompt; None uses the <think>/<answer> prompt of megammr.data.prompts.")
    max_prompt_tokens: int = F(4096, "Prompts longer than this (image tokens included) are skipped and counted.")
    min_pixels: int = F(3136, "Smallest image area after Qwen2.5-VL resizing (4 * 28 * 28).")
    max_pixels: int = F(1003520, "Largest image area after Qwen2.5-VL resizing (1280 * 28 * 28).")
    num_workers: int = F(2, "Data loader worker processes per rank. A saved loader state resumes only with the same count.")
    shuffle_buffer_size: int = F(100, "Samples in each worker's shuffle buffer (energon); shards are also read in seeded random order.")
    max_samples_per_sequence: int = F(100, "Samples read in a row from one shard before energon jumps to another (larger: faster I/O, weaker shuffling).")


@dataclass
class RolloutConfig:
    engine: Literal["auto", "vllm", "transformers"] = F("auto", "auto: vLLM with CUDA, transformers generate on CPU.")
    n: int = F(16, "Samples per prompt (the GRPO group size).")
    temperature: float = F(1.0, "Sampling temperature.")
    top_p: float = F(1.0, "Nucleus sampling threshold.")
    top_k: int = F(-1, "Top-k sampling; -1 disables.")
    max_new_tokens: int = F(4096, "Longest response in tokens.")
    gpu_memory_utilization: float = F(0.5, "Fraction of GPU memory vLLM may claim (colocated with training).")
    tp: Optional[int] = F(None, "vLLM tensor-parallel size; None uses parallel.tp.")
    enforce_eager: bool = F(True, "Disable CUDA graphs in vLLM (safe with sleep mode and weight sync).")
    max_images: int = F(4, "vLLM: most images in one prompt (limit_mm_per_prompt); a prompt with more is an error.")
    sleep_level: int = F(2, "vLLM sleep mode between rollouts: 2 discards weights and KV cache (the next sync reloads every weight), 1 keeps the weights in CPU memory.")
    max_batch_sequences: int = F(16, "transformers engine: sequences per generate() call (prompts x samples are batched).")
    replay: Optional[str] = F(None, "Directory of saved rollouts (OUTPUT_DIR/rollouts of an earlier run): train on them instead of generating.")


@dataclass
class RewardConfig:
    format_weight: float = F(0.5, "Weight of the strict <think>...</think><answer>...</answer> format reward.")
    accuracy_weight: float = F(1.0, "Weight of the accuracy reward (math-verify or multiple choice).")
    timeout_s: float = F(5.0, "Hard time limit per verification; a timed-out verification scores 0 and is counted.")
    workers: int = F(2, "Verifier worker processes.")
    require_think: bool = F(True, "The format reward needs a <think>...</think> block before the answer; False makes it optional.")
    require_answer_tag: bool = F(True, "Accuracy reads only the <answer> block; False falls back to the text after </think> (or the whole response), e.g. for evaluation.")
    max_answer_chars: int = F(1000, "Extracted answers longer than this score 0 accuracy without being parsed.")
    worker_memory_mb: int = F(2048, "Address-space limit per verifier process (a runaway sympy evaluation fails instead of swapping); 0 disables.")


@dataclass
class AlgoConfig:
    advantage: Literal["grpo", "dr_grpo"] = F("grpo", "grpo: (r - mean) / std per group; dr_grpo: r - mean, no std division.")
    clip_low: float = F(0.2, "Lower PPO clip bound: ratio >= 1 - clip_low.")
    clip_high: float = F(0.2, "Upper PPO clip bound: ratio <= 1 + clip_high (clip-higher uses e.g. 0.28).")
    kl_coef: float = F(1e-3, "Coefficient of the KL penalty against the reference policy; 0 disables the reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = F("k3", "KL estimator (k3 is the low-variance one).")
    loss_agg: Literal["token_mean", "seq_mean"] = F("token_mean", "token_mean over all tokens of the batch, or the mean of per-sequence token means.")
    tis_cap: Optional[float] = F(None, "Truncated importance sampling cap against the rollout engine's log-probs; None disables.")
    entropy_coef: float = F(0.0, "Entropy bonus coefficient.")
    dynamic_sampling: bool = F(False, "DAPO dynamic sampling: drop groups whose rewards are all equal (no signal) and refill from further prompts.")
    max_resample_rounds: int = F(3, "Dynamic sampling: extra generation rounds per step at most; a step may then train on fewer groups.")
    overlong_buffer: int = F(0, "DAPO overlong shaping: responses within this many tokens of rollout.max_new_tokens are penalised linearly; 0 disables.")
    overlong_penalty: float = F(1.0, "DAPO overlong shaping: the penalty at rollout.max_new_tokens (reaches it linearly over overlong_buffer tokens).")


@dataclass
class OptimConfig:
    lr: float = F(1e-6, "Peak learning rate.")
    min_lr: float = F(0.0, "Final learning rate of the cosine schedule.")
    schedule: Literal["constant", "cosine"] = F("constant", "Learning-rate schedule after warmup.")
    warmup_steps: int = F(0, "Linear warmup steps.")
    weight_decay: float = F(0.0, "AdamW weight decay.")
    adam_beta1: float = F(0.9, "Adam beta1.")
    adam_beta2: float = F(0.999, "Adam beta2.")
    adam_eps: float = F(1e-8, "Adam epsilon.")
    clip_grad: float = F(1.0, "Global gradient-norm clip.")
    distributed_optimizer: bool = F(False, "Shard optimizer state over data-parallel ranks (megatron DistributedOptimizer).")


@dataclass
class TrainConfig:
    steps: int = F(100, "GRPO steps (rollout + update) in this phase.")
    prompts_per_step: int = F(16, "Prompts per step; samples per step = prompts_per_step * rollout.n.")
    micro_batch_size: int = F(1, "Sequences per micro-batch in the forward/backward pass.")
    updates_per_step: int = F(1, "Optimizer steps per rollout batch (mini-batches).")
    checkpoint_interval: int = F(50, "Save a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = F(2, "Most recent checkpoints kept on disk; older ones are removed after a save succeeds.")
    output_dir: str = F("outputs/run", "Run directory: checkpoints, metrics, logs.")
    seed: int = F(1234, "Seed of every RNG (Python, NumPy, torch, megatron's model-parallel tracker, data shuffling).")
    log_interval: int = F(1, "Print and log metrics every this many steps.")
    max_tokens_per_micro_batch: Optional[int] = F(None, "Token budget of a micro-batch (rows x longest sequence, padding included; packed: the tokens of a pack); sequences are grouped by length under it. None: micro_batch_size rows.")
    pack_sequences: bool = F(False, "THD packing: a micro-batch is one row of whole sequences back to back (megatron PackedSeqParams) instead of rows padded to the longest; micro_batch_size / max_tokens_per_micro_batch then bound its sequences / tokens. The same loss and gradients as the padded path (tested on CPU); the fast path with model.layer_spec: te.")
    offload_during_rollout: bool = F(False, "While the engine generates, free the gradient buffers and move the optimizer state to the CPU (megatron-core's offload_grad_buffers / offload_to_cpu), so the engine's KV cache can use that memory; restored before the update. Not with optim.distributed_optimizer in fp32.")
    max_bad_steps: int = F(3, "Steps in a row with a non-finite loss or grad norm (each skipped and counted) before the run stops with an error.")
    save_rollouts: bool = F(False, "Write every step's rollouts (token ids, engine log-probs, rewards, prompts, images) to OUTPUT_DIR/rollouts/ for replay.")
    allow_recipe_change: bool = F(False, "Resume from a checkpoint even when the recipe differs in fields that change the result (they are listed).")
    export_hf: bool = F(True, "At the end of the phase, also write the final weights in HF format to OUTPUT_DIR/hf (loads in transformers).")
    sync_bucket_mb: int = F(512, "Weight sync Megatron -> rollout engine: size bound of one bucket of tensors in MiB.")
    cpu_threads: Optional[int] = F(None, "CPU only: torch intra-op threads per process (torch.set_num_threads); None keeps torch's choice (OMP_NUM_THREADS, else one per core). Ignored with CUDA.")
    progress: Literal["auto", "bar", "lines"] = F("auto", "What rank 0 shows per step: auto is a progress bar on a terminal and a plain line every log_interval steps otherwise (Slurm logs, CI); bar or lines forces one.")
    wandb_project: Optional[str] = F(None, "Also log every step's metrics to this Weights & Biases project (pip install wandb; WANDB_MODE=offline needs no network). None: off.")


@dataclass
class PhaseConfig:
    name: str = F("phase1", "Phase name (phase1 text, phase2 caption-augmented, phase3 caption-free).")
    init_from: Optional[str] = F(None, "Checkpoint directory this phase starts from (the previous phase's final one); None: model.hf_path or random.")


@dataclass
class Recipe:
    model: ModelConfig = F(ModelConfig(), "The backbone and its numerics.")
    parallel: ParallelConfig = F(ParallelConfig(), "Model parallelism; data parallelism is derived.")
    data: DataConfig = F(DataConfig(), "Shards and prompt construction.")
    rollout: RolloutConfig = F(RolloutConfig(), "Sampling.")
    reward: RewardConfig = F(RewardConfig(), "Rule-based reward weights and verifier limits.")
    algo: AlgoConfig = F(AlgoConfig(), "GRPO advantages and policy loss.")
    optim: OptimConfig = F(OptimConfig(), "Optimizer and schedule.")
    train: TrainConfig = F(TrainConfig(), "Loop sizes, checkpointing and output.")
    phase: PhaseConfig = F(PhaseConfig(), "Curriculum phase.")

    def data_parallel_size(self, world_size: int) -> int:
        mp = self.parallel.tp * self.parallel.pp * self.parallel.cp
        if world_size % mp:
            raise RecipeError(f"world size {world_size} is not divisible by tp*pp*cp = {mp}")
        return world_size // mp


@dataclass(frozen=True)
class ToolDefaults:
    """Defaults of the data, captioning, evaluation and tiny-model tools: not recipe fields (they
    shape no training run), kept here so that each tool's flag and the library function behind it
    read one value."""
    decontam_ngram: int = 13  # word n-gram shared with an eval question = contaminated (GPT-3's and Llama's length)
    shard_max_mb: float = 256.0  # largest shard (tools/build_shards.py --shard-size-mb)
    shard_max_records: int = 10_000  # most records per shard (--shard-records)
    caption_batch_size: int = 8  # records per generate call (tools/caption.py --batch-size)
    caption_max_new_tokens: int = 256  # longest caption (--max-new-tokens)
    eval_batch_size: int = 8  # prompts per generate call (megammr eval --batch-size)
    # The tiny model's supervised format warm-up (models/warmup.py, tools/make_tiny_model.py), tuned
    # on recipes/tiny: at temperature 1.0 and 48 new tokens the strict format then comes out roughly
    # a third of the time, accuracy near zero.
    warmup_steps: int = 35
    warmup_lr: float = 3e-3
    warmup_batch: int = 16


TOOLS = ToolDefaults()


# --------------------------------------------------------------------------- loading
class RecipeError(ValueError):
    """A recipe or override that does not fit the schema. Each line names the file (or "command
    line") and the key; `errors` holds every problem found, one line each, as a compiler reports
    them all rather than the first."""

    def __init__(self, errors):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class RecipeWarning(UserWarning):
    """A recipe that runs as written but likely not as meant (the CLI shows it as one line)."""


class _Problems(list):
    """Error lines collected while a recipe is built, and the dotted keys they are about: a
    cross-field rule that reads one of those keys is skipped (the value there is a default, not
    the user's, so a verdict on it would mislead)."""

    def __init__(self):
        super().__init__()
        self.keys: set[str] = set()

    def add(self, key: str, err: RecipeError) -> None:
        self.extend(err.errors)
        self.keys.add(key)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, src: str, raw: Optional[str] = None):
    """Check (and minimally convert) one value against a field type.

    `key` is the dotted key, `src` the file (or "command line") it came from; errors name both.
    `raw` is the command-line text, so that str and Literal fields take it verbatim.
    """
    where = f"{src}: {key}" if src else key
    origin = typing.get_origin(tp)
    bad = RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return _coerce(value, inner, key, src, raw)
        except RecipeError:
            raise bad from None
    if origin is Literal:
        choices = typing.get_args(tp)
        if raw is not None and raw in choices:
            return raw
        if value in choices and type(value) is type(choices[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        out, errors = [], []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, inner, f"{key}[{i}]", src))
            except RecipeError as e:
                errors.extend(e.errors)
        if errors:
            raise RecipeError(errors)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, {}, src)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-6" (no dot) as a string; accept what float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if raw is not None:
            return raw
        if isinstance(value, str):
            return value
        raise bad
    raise RecipeError(f"{where}: unsupported field type {tp!r}")


def _hints(cls):
    return typing.get_type_hints(cls)


def _build(cls, data: dict, prefix: str, origins: dict[str, str], default_src: str = "",
           problems: Optional[_Problems] = None):
    """cls(**data) with every value checked. A bad value is recorded in `problems` and its field
    keeps the default, so one run reports every problem; without `problems` they are raised
    together at the end."""
    own = problems is None
    problems = _Problems() if own else problems
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        src = origins.get(dotted, origins.get(prefix, default_src))
        where = f"{src}: {dotted}" if src else dotted
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            stem = re.sub(r"\[\d+\]", "", prefix)  # suggest the schema key, not the list index
            hint = f"; did you mean '{(stem + '.') if stem else ''}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(names)}"
            problems.add(dotted, RecipeError(f"{where}: unknown key{hint}"))
            continue
        tp = hints[key]
        try:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
                kwargs[key] = _build(tp, value, dotted, origins, src, problems)
            else:
                kwargs[key] = _coerce(value, tp, dotted, src)
        except RecipeError as e:
            problems.add(dotted, e)
    obj = cls(**kwargs)
    if own and problems:
        raise RecipeError(list(problems))
    return obj


def _shown(path: str) -> str:
    """A path as the user would type it: relative to the current directory when below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _dir_hint(path: str) -> str:
    names = sorted(f for f in os.listdir(path) if f.endswith((".yaml", ".yml")))
    if not names:
        return f"{path}: is a directory, not a recipe file (it holds no .yaml files)"
    first = next((n for n in names if n.startswith("phase")), names[0])
    return (f"{path}: is a directory, not a recipe file; pass one of its files, e.g. "
            f"{os.path.join(path, first)} (there: {', '.join(names)})")


def _read_yaml(path: str, shown: Optional[str] = None) -> dict:
    shown = shown or path
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {shown}") from None
    except IsADirectoryError:
        raise RecipeError(_dir_hint(shown)) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{shown}: not UTF-8 text (a recipe is a YAML file)") from None
    except OSError as e:
        raise RecipeError(f"{shown}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{shown}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}: a recipe must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, origins: dict, src: str, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in top.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            origins.setdefault(dotted, src)
            out[k] = _merge(out[k], v, origins, src, dotted)
        else:
            out[k] = v
            origins[dotted] = src
            if isinstance(v, dict):
                for sub in _walk_keys(v, dotted):
                    origins[sub] = src
    return out


def _walk_keys(d: dict, prefix: str):
    for k, v in d.items():
        dotted = f"{prefix}.{k}"
        yield dotted
        if isinstance(v, dict):
            yield from _walk_keys(v, dotted)


def _load_chain(path: str, origins: dict, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    shown = _shown(path)
    if path in seen:
        raise RecipeError(f"{shown}: circular extends: {' -> '.join(map(_shown, seen + (path,)))}")
    data = _read_yaml(path, shown)
    if "curriculum" in data and not seen:
        raise RecipeError(f"{shown}: a curriculum file, not a recipe: `megammr train {shown}` runs its phases, "
                          f"`megammr config show {shown}` shows them")
    parent = data.pop("extends", None)
    merged: dict = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"{shown}: extends: expected a path (str), got {parent!r}")
        target = os.path.join(os.path.dirname(path), parent)
        if not os.path.isfile(target):
            what = "is a directory" if os.path.isdir(target) else "not found"
            raise RecipeError(f"{shown}: extends: {parent}: {what} (looked for {_shown(os.path.abspath(target))}; "
                              "the path is relative to the extending file)")
        merged = _load_chain(target, origins, seen + (path,))
    return _merge(merged, data, origins, shown)


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r}: empty key")
    return key, raw


def _apply_override(data: dict, key: str, raw: str, origins: dict):
    """Set data[key] from a command-line string, typed against the schema at that key."""
    parts = key.split(".")
    cls, node, prefix = Recipe, data, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        dotted = f"{prefix}.{part}" if prefix else part
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"command line: {dotted}: unknown key{hint}")
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            node[part] = _coerce(value, tp, dotted, "command line", raw=raw)
            if dataclasses.is_dataclass(node[part]):
                node[part] = dataclasses.asdict(node[part])
            elif isinstance(node[part], list):
                node[part] = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in node[part]]
            origins[dotted] = "command line"
            return
        if not dataclasses.is_dataclass(tp):
            raise RecipeError(f"command line: {dotted} is a {_type_name(tp)}, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"command line: {dotted} is not a mapping in the recipe")
        cls, prefix = tp, dotted


def load_recipe(path: Optional[str] = None, overrides: list[str] = (), *, world_size: Optional[int] = None,
                base: Optional[tuple[dict, str]] = None) -> Recipe:
    """Load a recipe file (following `extends:`), or `base` = (a recipe as a dict, e.g. the one a
    checkpoint saved; a label naming it in errors), apply key=value overrides, check everything.

    Every problem found (unknown keys, types, overrides, cross-field rules) is raised together in
    one RecipeError. With `world_size` the data-parallel split is checked too (layout_errors).
    What runs but is likely not meant is a RecipeWarning."""
    origins: dict[str, str] = {}
    data = _load_chain(path, origins) if path else {}
    if base is not None and not path:
        data = _merge({}, base[0], origins, base[1])
    on_command_line = _Problems()
    for text in overrides:
        try:
            key, raw = parse_override(text)
            _apply_override(data, key, raw, origins)
        except RecipeError as e:
            on_command_line.add(text.split("=", 1)[0].strip(), e)
    problems = _Problems()
    recipe = _build(Recipe, data, "", origins, problems=problems)
    problems.extend(on_command_line)  # in reading order: the files, then the command line
    errors, notes = cross_checks(recipe, origins, problems.keys | on_command_line.keys, world_size)
    problems.extend(errors)
    if problems:
        raise RecipeError(list(problems))
    for note in notes:
        warnings.warn(note, RecipeWarning, stacklevel=2)
    return recipe


def validate(r: Recipe, world_size: Optional[int] = None) -> None:
    """Cross-field checks that a type cannot express; RecipeError listing every failure."""
    errors, _ = cross_checks(r, {}, set(), world_size)
    if errors:
        raise RecipeError(errors)


def to_dict(r: Recipe) -> dict:
    return dataclasses.asdict(r)


def to_yaml(r: Recipe) -> str:
    return yaml.safe_dump(to_dict(r), sort_keys=False, default_flow_style=False)


def field_docs(cls=Recipe, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field, for `megammr config fields`."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, dotted))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((dotted, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
