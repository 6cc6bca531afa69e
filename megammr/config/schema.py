"""The recipe schema: typed sections whose field defaults are the ONLY place defaults live.

Each field carries a one-line help text (`megammr config fields` prints it). Reading YAML,
overrides and type checks are megammr.config.load; rules between fields are megammr.config.rules.
This module imports nothing of megammr's, so anything may import it.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


def F(default: Any, help: str):
    """A field with its documentation attached (shown by `megammr config fields`)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class RecipeError(ValueError):
    """A recipe or override that does not fit the schema. Each line names the file (or "command
    line") and the key; `errors` holds every problem found, one line each, as a compiler reports
    them all rather than the first."""

    def __init__(self, errors):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class RecipeWarning(UserWarning):
    """A recipe that runs as written but likely not as meant (the CLI shows it as one line)."""


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    backbone: str = F("tiny", "Name in the backbones table: tiny, qwen2.5-vl-3b, -7b, -32b, -72b.")
    hf_path: Optional[str] = F(
        None, "HF checkpoint directory (weights, tokenizer, processor). None: random weights, tiny only.")
    layer_spec: Literal["local", "te"] = F(
        "local", "megatron-core layer spec: 'te' (TransformerEngine, GPU, FP8-capable) or 'local' (pure torch, CPU).")
    precision: Literal["fp32", "bf16", "fp8"] = F(
        "bf16", "Training precision. fp8 needs layer_spec=te and a GPU; weights stay bf16.")
    fp8_recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise"] = F(
        "tensorwise", "TransformerEngine FP8 scaling recipe (precision=fp8 only).")
    freeze_vision: bool = F(False, "Keep the vision tower and patch merger frozen during RL.")
    recompute: Optional[Literal["full", "selective"]] = F(
        None, "Activation recomputation granularity; None keeps all activations.")


@dataclass
class ParallelConfig:
    tp: int = F(1, "Tensor-parallel size of the language decoder.")
    pp: int = F(1, "Pipeline-parallel size of the language decoder.")
    cp: int = F(1, "Context-parallel size (optional; 1 disables).")
    sequence_parallel: bool = F(False, "Megatron sequence parallelism (needs tp > 1 and TE or apex norms).")
    dist_timeout_s: float = F(
        600.0,
        "torch.distributed timeout in seconds: a rank that waits longer "
        "than this for the others in a collective fails instead of hanging.")
    # dp is derived: world_size // (tp * pp * cp); see Recipe.data_parallel_size.


@dataclass
class DatasetConfig:
    path: str = F("", "Directory of webdataset shards with energon metadata (.nv-meta).")
    weight: float = F(1.0, "Relative sampling weight when several datasets are blended in one phase.")


@dataclass
class CurateConfig:
    """`data.curate`: before the phase trains, keep only the prompts a model solves sometimes
    (megammr/curate.py; the same pass `megammr curate` runs)."""
    n: int = F(8, "Samples per prompt; a prompt's pass rate is the fraction of them with accuracy 1.")
    keep: list[float] = F(
        [0.1, 0.9], "[LO, HI]: records with LO <= pass rate <= HI are kept (at n=8: drops never/always solved).")
    model: str = F(
        "previous", "Model that samples: 'previous' (the previous phase's export, OUTPUT_DIR/hf) or an HF directory.")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = F([], "Shard directories of this phase (weighted blend when more than one).")
    prompt_style: Literal["text", "caption", "image"] = F(
        "text", "text: phase 1, no image; caption: image plus its caption (phase 2); image: caption-free (phase 3).")
    system_prompt: Optional[str] = F(
        None, "System prompt; None uses the <think>/<answer> prompt of megammr.data.prompts.")
    max_prompt_tokens: int = F(4096, "Prompts longer than this (image tokens included) are skipped and counted.")
    min_pixels: int = F(3136, "Smallest image area after Qwen2.5-VL resizing (4 * 28 * 28).")
    max_pixels: int = F(1003520, "Largest image area after Qwen2.5-VL resizing (1280 * 28 * 28).")
    num_workers: int = F(
        2, "Data loader worker processes per rank. A saved loader state resumes only with the same count.")
    shuffle_buffer_size: int = F(
        100, "Samples in each worker's shuffle buffer (energon); shards are also read in seeded random order.")
    max_samples_per_sequence: int = F(
        100,
        "Samples read in a row from one shard before energon jumps to another (larger: faster I/O, weaker shuffling).")
    curate: Optional[CurateConfig] = F(
        None, "Pass-rate curation of this phase's data before it trains (data.curate.n, .keep, .model); None: off.")


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
    sleep_level: int = F(
        2,
        "vLLM sleep mode between rollouts: 2 discards weights and KV cache (the "
        "next sync reloads every weight), 1 keeps the weights in CPU memory.")
    max_batch_sequences: int = F(
        16, "transformers engine: sequences per generate() call (prompts x samples are batched).")
    replay: Optional[str] = F(
        None,
        "Directory of saved rollouts (OUTPUT_DIR/rollouts of an earlier run): train on them instead of generating.")


@dataclass
class RewardConfig:
    format_weight: float = F(0.5, "Weight of the strict <think>...</think><answer>...</answer> format reward.")
    accuracy_weight: float = F(1.0, "Weight of the accuracy reward (math-verify or multiple choice).")
    timeout_s: float = F(5.0, "Hard time limit per verification; a timed-out verification scores 0 and is counted.")
    workers: int = F(2, "Verifier worker processes.")
    require_think: bool = F(
        True, "The format reward needs a <think>...</think> block before the answer; False makes it optional.")
    require_answer_tag: bool = F(
        True,
        "Accuracy reads only the <answer> block; False falls back to the "
        "text after </think> (or the whole response), e.g. for evaluation.")
    max_answer_chars: int = F(1000, "Extracted answers longer than this score 0 accuracy without being parsed.")
    worker_memory_mb: int = F(
        2048,
        "Address-space limit per verifier process (a runaway sympy evaluation fails instead of swapping); 0 disables.")


@dataclass
class AlgoConfig:
    policy_loss: Literal["grpo", "gspo"] = F(
        "grpo",
        "grpo: token-level clipped ratio (fused kernel); gspo: one length-normalised ratio per "
        "sequence (arXiv 2507.18071; needs loss_agg=seq_mean, its paper clips at 3e-4/4e-4).")
    advantage: Literal["grpo", "dr_grpo"] = F(
        "grpo", "grpo: (r - mean) / std per group; dr_grpo: r - mean, no std division.")
    clip_low: float = F(0.2, "Lower PPO clip bound: ratio >= 1 - clip_low.")
    clip_high: float = F(0.2, "Upper PPO clip bound: ratio <= 1 + clip_high (clip-higher uses e.g. 0.28).")
    kl_coef: float = F(
        1e-3, "Coefficient of the KL penalty against the reference policy; 0 disables the reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = F("k3", "KL estimator (k3 is the low-variance one).")
    loss_agg: Literal["token_mean", "seq_mean"] = F(
        "token_mean", "token_mean over all tokens of the batch, or the mean of per-sequence token means.")
    tis_cap: Optional[float] = F(
        None, "Truncated importance sampling cap against the rollout engine's log-probs; None disables.")
    entropy_coef: float = F(0.0, "Entropy bonus coefficient.")
    dynamic_sampling: bool = F(
        False,
        "DAPO dynamic sampling: drop groups whose rewards are all equal (no signal) and refill from further prompts.")
    max_resample_rounds: int = F(
        3, "Dynamic sampling: extra generation rounds per step at most; a step may then train on fewer groups.")
    overlong_buffer: int = F(
        0,
        "DAPO overlong shaping: responses within this many tokens of "
        "rollout.max_new_tokens are penalised linearly; 0 disables.")
    overlong_penalty: float = F(
        1.0,
        "DAPO overlong shaping: the penalty at rollout.max_new_tokens "
        "(reaches it linearly over overlong_buffer tokens).")


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
    distributed_optimizer: bool = F(
        False, "Shard optimizer state over data-parallel ranks (megatron DistributedOptimizer).")


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
    max_tokens_per_micro_batch: Optional[int] = F(
        None,
        "Token budget of a micro-batch (rows x longest sequence, padding included; packed: the "
        "tokens of a pack); sequences are grouped by length under it. None: micro_batch_size rows.")
    pack_sequences: bool = F(
        False,
        "THD packing: a micro-batch is one row of whole sequences back to back (megatron PackedSeqParams) instead of "
        "rows padded to the longest; micro_batch_size / max_tokens_per_micro_batch then bound its sequences / tokens. "
        "The same loss and gradients as the padded path (tested on CPU); the fast path with model.layer_spec: te.")
    offload_during_rollout: bool = F(
        False,
        "While the engine generates, free the gradient buffers and move the optimizer state to the "
        "CPU (megatron-core's offload_grad_buffers / offload_to_cpu), so the engine's KV cache can "
        "use that memory; restored before the update. Not with optim.distributed_optimizer in fp32.")
    max_bad_steps: int = F(
        3,
        "Steps in a row with a non-finite loss or grad norm (each "
        "skipped and counted) before the run stops with an error.")
    save_rollouts: bool = F(
        False,
        "Write every step's rollouts (token ids, engine log-probs, "
        "rewards, prompts, images) to OUTPUT_DIR/rollouts/ for replay.")
    allow_recipe_change: bool = F(
        False,
        "Resume from a checkpoint even when the recipe differs in fields that change the result (they are listed).")
    export_hf: bool = F(
        True,
        "At the end of the phase, also write the final weights in HF format to OUTPUT_DIR/hf (loads in transformers).")
    sync_bucket_mb: int = F(512, "Weight sync Megatron -> rollout engine: size bound of one bucket of tensors in MiB.")
    cpu_threads: Optional[int] = F(
        None,
        "CPU only: torch intra-op threads per process (torch.set_num_threads); None "
        "keeps torch's choice (OMP_NUM_THREADS, else one per core). Ignored with CUDA.")
    progress: Literal["auto", "bar", "lines"] = F(
        "auto",
        "What rank 0 shows per step: auto is a progress bar on a terminal and a plain line "
        "every log_interval steps otherwise (Slurm logs, CI); bar or lines forces one.")
    wandb_project: Optional[str] = F(
        None,
        "Also log every step's metrics to this Weights & Biases project (pip "
        "install wandb; WANDB_MODE=offline needs no network). None: off.")


@dataclass
class PhaseConfig:
    name: str = F("phase1", "Phase name (phase1 text, phase2 caption-augmented, phase3 caption-free).")
    init_from: Optional[str] = F(
        None,
        "Checkpoint directory this phase starts from (the previous phase's final one); None: model.hf_path or random.")


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
    read one value. Shared by data/, eval/, megammr/warmup.py and tools/, hence here rather than
    beside one of them."""
    decontam_ngram: int = 13  # word n-gram shared with an eval question = contaminated (GPT-3's and Llama's length)
    shard_max_mb: float = 256.0  # largest shard (tools/build_shards.py --shard-size-mb)
    shard_max_records: int = 10_000  # most records per shard (--shard-records)
    caption_batch_size: int = 8  # records per generate call (tools/caption.py --batch-size)
    caption_max_new_tokens: int = 256  # longest caption (--max-new-tokens)
    eval_batch_size: int = 8  # prompts per generate call (megammr eval --batch-size)
    # `megammr data import`: a longer normalised gold answer is a solution, not a verifiable answer
    import_max_answer_chars: int = 256  # (--max-answer-chars)
    import_progress_every: int = 5000  # one progress line per this many rows when stderr is not a terminal
    # The tiny model's supervised format warm-up (megammr/warmup.py, tools/make_tiny_model.py), tuned
    # on recipes/tiny: at temperature 1.0 and 48 new tokens the strict format then comes out roughly
    # a third of the time, accuracy near zero.
    warmup_steps: int = 35
    warmup_lr: float = 3e-3
    warmup_batch: int = 16
    # `megammr plan` (megammr/plan.py): the machine planned for
    plan_gpus_per_node: int = 8  # (--gpus-per-node)
    plan_gpu_mem_gib: float = 80.0  # memory of one GPU in GiB (--gpu-mem-gib)
    # `megammr curate` (megammr/curate.py)
    curate_batch_size: int = 8  # prompts per generate call (--batch-size); also fixes the sampling seeds
    curate_progress_every: int = 50  # one progress line per this many prompts when stderr is not a terminal
    curate_keep_unlabelled: bool = False  # --pass-rate-column: keep records whose value is missing or -1 (--keep-unlabelled)


TOOLS = ToolDefaults()

