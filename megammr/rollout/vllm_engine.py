"""Rollouts with vLLM, colocated with Megatron in the same SPMD processes (GPU only).

Nothing here imports vllm at module import (it is an optional GPU dependency; the registry
imports this module on CPU machines too): the engine is built by `VLLMEngine.build`,
which calls `require_vllm()` (a one-line error naming the extra when it cannot be imported). All
vLLM calls go through the `llm` object (vllm.LLM) and the `sampling_cls` (vllm.SamplingParams)
the engine is given, so everything else (request building, log-prob extraction, the sleep/wake
state machine, weight-load bookkeeping, the follower protocol) runs and is tested on CPU with
stand-ins. The calls follow vLLM's documented offline API (docs: sleep mode, multimodal inputs,
external launcher, logprobs_mode):

- Built before Megatron allocates, in every process, with
  `distributed_executor_backend="external_launcher"`: vLLM then runs its engine core in this
  process and splits the torch.distributed world into groups of `tensor_parallel_size`
  consecutive ranks, which is Megatron's tensor-parallel group (parallel.pp = 1, rollout.tp =
  parallel.tp; `VLLMEngine.check` refuses other layouts). `load_format="dummy"`:
  the first weight sync writes every weight. Then `sleep(level=2)` straight away.
- Every rank of a vLLM TP group must call generate with identical prompts and seeds. The
  group's source rank (tensor rank 0) holds the data; it broadcasts each generate call's inputs to
  the other ranks, which run `follow_rollouts()` until the source calls `finish_rollouts()`.
- Lifecycle per step: sync: wake_up(["weights"]) -> load_weights per bucket (HF checkpoint names,
  full TP-gathered tensors; vLLM slices its own shard) -> process_weights_after_loading ->
  reset prefix + encoder + multimodal caches; generate: wake_up(["kv_cache"]) -> generate ...;
  finish_rollouts: sleep(rollout.sleep_level). Level 2 discards the weights, so every sync must
  write every parameter: each sync checks the names vLLM reports as loaded against its parameters.
- Images: `{"prompt": text, "multi_modal_data": {"image": ...}}` with the recipe's min/max pixels
  as engine-level `mm_processor_kwargs`, so vLLM's expanded prompt ids equal the trainer's (the
  trainer compares them every step and counts a mismatch).
- Log-probs: `logprobs_mode="processed_logprobs"` (after temperature) and `logprobs=0` (the
  sampled token only): log softmax(logits / T)[token], what the trainer recomputes. vLLM's
  processed log-probs would also apply top-k/top-p, which the Rollout contract excludes, so this
  engine refuses top_k > 0 and top_p < 1. `generation_config="vllm"` keeps the checkpoint's
  generation_config.json (Qwen ships repetition_penalty 1.05, top_k 1, ...) out of sampling.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megammr import runtime
from megammr.models.processor import load_processor
from megammr.rollout.base import Rollout, RolloutEngine, RolloutPrompt, SamplingParams
from megammr.versions import installed_version, version_tuple

# lazy in this module: vllm itself (an optional GPU extra; the registry imports this module on
# CPU machines too), in require_vllm() and _process_after_loading().

INSTALL_HINT = 'pip install -e ".[gpu]"'
# The supported range [min, max), pinned the same in pyproject's `gpu` extra: below min a feature
# the engine needs is missing (processed log-probs 0.10.2, wake tags 0.8.3, encoder-cache reset
# ~0.16); max is one past the newest release the code was written against (0.33).
# tests/gpu/test_vllm_gpu.py checks an installed version (README "GPU path").
MIN_VERSION, MAX_VERSION = "0.16", "0.34"
IMAGE_PAD = "<|image_pad|>"


class EngineUnavailable(RuntimeError):
    """The vLLM engine cannot be used in this process (package, CUDA or version); one line."""


@dataclass(frozen=True)
class VLLMFeatures:
    """What a vLLM version offers that this engine uses (the version gate)."""
    version: str
    processed_logprobs: bool      # logprobs_mode="processed_logprobs" (vLLM PR 21398/22387, 0.10.2)
    wake_tags: bool               # wake_up(tags=[...]) (0.8.3)
    encoder_cache_reset: bool     # reset_encoder_cache() (vLLM PR 33452, ~0.16)
    native_weight_transfer: bool  # WeightTransferConfig + update_weights (0.17): for a separate engine process
    weight_path: str              # how this engine writes weights: "load_weights" (in process)


def features_for(version: str) -> VLLMFeatures:
    v = version_tuple(version)
    # With external_launcher the model lives in this process, so the in-process load_weights path
    # (through LLM.apply_model) is used at every version. vLLM's native weight-transfer API is
    # designed for an engine in another process (Ray/HTTP, NCCL or CUDA IPC), which this build
    # does not have; the flag only records that the version offers it.
    return VLLMFeatures(version=version, processed_logprobs=v >= (0, 10, 2), wake_tags=v >= (0, 8, 3),
                        encoder_cache_reset=v >= (0, 16), native_weight_transfer=v >= (0, 17),
                        weight_path="load_weights")


def version_problems(version: Optional[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of an installed vLLM version against the tested range."""
    if version is None:
        return [f"rollout.engine=vllm: vLLM is not installed ({INSTALL_HINT})"], []
    if version_tuple(version) < version_tuple(MIN_VERSION):
        return [f"rollout.engine=vllm: vLLM {version} is older than {MIN_VERSION} (processed log-probs, wake tags "
                f"and the encoder-cache reset are needed); {INSTALL_HINT}"], []
    if version_tuple(version) >= version_tuple(MAX_VERSION):
        return [], [f"vLLM {version} is newer than the supported range [{MIN_VERSION}, {MAX_VERSION}): "
                    "run tests/gpu/test_vllm_gpu.py with it (tools/gpu_check.sh)"]
    return [], []


def vllm_version() -> Optional[str]:
    """The installed vLLM's version from its metadata (nothing imported), or None."""
    return installed_version("vllm")


def require_vllm():
    """Import vllm, or raise EngineUnavailable with one line naming the extra."""
    try:
        import vllm
    except Exception as e:  # ImportError, or a CUDA library error from vLLM's extensions
        raise EngineUnavailable(f"rollout.engine=vllm needs vLLM and a GPU ({INSTALL_HINT}; import failed: "
                                f"{type(e).__name__}: {e}); use rollout.engine=transformers on CPU") from None
    return vllm


# ----------------------------------------------------------------------------- pure parts
def llm_kwargs(recipe, *, rank: int, tp: int) -> dict:
    """Keyword arguments of vllm.LLM for this recipe on global rank `rank` (documented engine args)."""
    m, ro, d = recipe.model, recipe.rollout, recipe.data
    return dict(
        model=m.hf_path, tokenizer=m.hf_path, load_format="dummy",  # the first sync writes every weight
        distributed_executor_backend="external_launcher", tensor_parallel_size=tp,
        seed=rank // tp,                       # the same within a vLLM TP group (requests carry their own)
        dtype="float32" if m.precision == "fp32" else "bfloat16",   # FP8 training keeps bf16 weights
        enable_sleep_mode=True, enforce_eager=ro.enforce_eager, gpu_memory_utilization=ro.gpu_memory_utilization,
        max_model_len=d.max_prompt_tokens + ro.max_new_tokens,
        limit_mm_per_prompt={"image": ro.max_images, "video": 0},
        mm_processor_kwargs={"min_pixels": d.min_pixels, "max_pixels": d.max_pixels},
        enable_prefix_caching=True, logprobs_mode="processed_logprobs", generation_config="vllm",
        disable_custom_all_reduce=True,        # as verl's colocated engine: no extra IPC buffers to sleep
    )


def launcher_env(rank: int, local_rank: int, world_size: int, master_addr: str, master_port: int) -> dict:
    """The environment external_launcher reads: the same world torchrun/srun gave Megatron."""
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine core in this process (vLLM sets it too)


def request_seed(seed: int, prompt_index: int) -> int:
    """The seed of prompt i's request (its n samples come from that request's generator)."""
    return int(np.random.SeedSequence([seed % 2**64, prompt_index]).generate_state(2, np.uint64)[0] >> 1)


def build_requests(prompts: Sequence[Any], max_images: int) -> list[dict]:
    """vLLM prompt dicts: the rendered chat text (one <|image_pad|> per image; vLLM expands them)
    and the PIL images as multi_modal_data."""
    reqs = []
    for i, p in enumerate(prompts):
        images = list(getattr(p, "images", None) or [])
        pads = p.text.count(IMAGE_PAD)
        if pads != len(images):
            raise ValueError(f"prompt {i}: {pads} {IMAGE_PAD} placeholders for {len(images)} images")
        if len(images) > max_images:
            raise ValueError(f"prompt {i} has {len(images)} images; rollout.max_images={max_images} "
                             "(vLLM's limit_mm_per_prompt): raise it")
        req: dict[str, Any] = {"prompt": p.text}
        if images:
            req["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        reqs.append(req)
    return reqs


def sampling_kwargs(sampling: SamplingParams, n: int, seed: Optional[int], stop_ids: Sequence[int]) -> dict:
    """vllm.SamplingParams keyword arguments of one request."""
    if sampling.top_k > 0 or sampling.top_p < 1.0:
        raise ValueError("the vLLM engine samples from the full distribution only (top_k=-1, top_p=1): its "
                         "processed log-probs would be of the truncated one, not what the trainer recomputes")
    kw = dict(n=n, temperature=max(0.0, float(sampling.temperature)), max_tokens=sampling.max_new_tokens,
              logprobs=0, stop_token_ids=list(stop_ids), repetition_penalty=1.0, skip_special_tokens=True)
    if seed is not None:
        kw["seed"] = int(seed)
    return kw


def _logprob_value(entry) -> float:
    return float(entry.logprob if hasattr(entry, "logprob") else entry)


def token_logprobs(entries, token_ids: Sequence[int]) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position {token_id: Logprob} dicts."""
    if entries is None:
        raise RuntimeError("vLLM returned no log-probs (SamplingParams(logprobs=0) was not honoured)")
    if len(entries) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(entries)} log-prob positions for {len(token_ids)} tokens")
    out = []
    for k, (d, t) in enumerate(zip(entries, token_ids)):
        if t not in d:
            raise RuntimeError(f"vLLM's log-probs at position {k} do not hold the sampled token {t}")
        out.append(_logprob_value(d[t]))
    return out


def extract_rollouts(outputs: Sequence[Any], n: int) -> list[Rollout]:
    """vllm.RequestOutput list (request order) -> Rollouts in prompt-major order."""
    rollouts = []
    for i, ro in enumerate(outputs):
        samples = sorted(ro.outputs, key=lambda o: o.index)
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected n={n}")
        prompt_ids = [int(t) for t in (getattr(ro, "prompt_token_ids", None) or [])]
        for j, o in enumerate(samples):
            ids = [int(t) for t in o.token_ids]
            if o.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {i} sample {j} ended with finish_reason={o.finish_reason!r}")
            rollouts.append(Rollout(prompt_index=i, sample_index=j, text=o.text, token_ids=ids,
                                    logprobs=token_logprobs(o.logprobs, ids), finish_reason=o.finish_reason,
                                    prompt_token_ids=prompt_ids))
    return rollouts


def stop_token_ids(hf_path: str, tokenizer) -> list[int]:
    """End-of-turn ids as the transformers engine uses them: generation_config's eos ids + <|im_end|>."""
    ids = set()
    path = os.path.join(hf_path, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids |= {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end >= 0:
        ids.add(im_end)
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


# ----------------------------------------------------------------------------- the engine
class VLLMEngine(RolloutEngine):
    """RolloutEngine over a colocated vllm.LLM."""

    label = "vLLM"
    collective = True  # every rank of the vLLM TP group calls generate (the followers via follow_rollouts)
    build_before_model = True  # vLLM claims gpu_memory_utilization of the whole GPU at start
    settings = ("gpu_memory_utilization", "tp", "enforce_eager", "max_images", "sleep_level")

    def __init__(self, llm, sampling_cls, *, stop_ids: Sequence[int], max_images: int, sleep_level: int,
                 group=None, leader: int = 0, is_leader: bool = True, vision_trainable: bool = True):
        self.llm, self.sampling_cls = llm, sampling_cls
        self.stop_ids = list(stop_ids)
        self.max_images, self.sleep_level = int(max_images), int(sleep_level)
        self.group, self.leader, self.is_leader = group, leader, is_leader
        self.vision_trainable = vision_trainable
        self.asleep: set[str] = set()        # memory tags released (vLLM's "weights", "kv_cache")
        self.synced = False                  # every parameter written since the last level-2 sleep
        self._loaded: set[str] = set()
        self._model = None
        self.encoder_reset_available = True

    # ------------------------------------------------------------------ recipe checks
    @classmethod
    def available(cls, cuda: bool) -> tuple[bool, str]:
        if not cuda:
            return False, ""  # a CPU machine: the transformers engine is expected, nothing to say
        if vllm_version() is None:
            return False, f"vLLM is not installed ({INSTALL_HINT})"
        return True, ""

    @classmethod
    def check(cls, recipe, cuda: bool) -> list[str]:
        if not cuda:
            return ["rollout.engine=vllm needs CUDA (no GPU is visible); use rollout.engine=transformers on CPU"]
        version = vllm_version()
        if version is None:
            errors = [f"rollout.engine=vllm: vLLM is not installed ({INSTALL_HINT}), "
                      "or use rollout.engine=transformers"]
        else:
            errors = version_problems(version)[0]
        r = recipe
        if r.parallel.pp > 1:
            errors.append("rollout.engine=vllm with parallel.pp > 1: the colocated engine needs its tensor-parallel "
                          "group to be Megatron's (use pp=1, or rollout.engine=transformers)")
        if r.rollout.tp not in (None, r.parallel.tp):
            errors.append(f"rollout.tp={r.rollout.tp} with parallel.tp={r.parallel.tp}: the colocated vLLM engine "
                          "uses Megatron's tensor-parallel group (leave rollout.tp unset or equal to parallel.tp)")
        if r.rollout.top_k > 0 or r.rollout.top_p < 1.0:
            errors.append("rollout.top_k/top_p with rollout.engine=vllm: vLLM's processed log-probs are of the "
                          "truncated distribution, the trainer recomputes the full one (use top_k=-1, top_p=1)")
        return errors

    @classmethod
    def warnings(cls, recipe, cuda: bool) -> list[str]:
        return version_problems(vllm_version())[1] if cuda else []

    @classmethod
    def build(cls, recipe, rt, *, group, leader: int, is_leader: bool) -> "VLLMEngine":
        """Build vllm.LLM in this process (every rank of the world, before Megatron allocates)."""
        if not torch.cuda.is_available():
            raise EngineUnavailable("rollout.engine=vllm needs CUDA (no GPU is visible); use "
                                    "rollout.engine=transformers on CPU")
        errors, warnings = version_problems(vllm_version())
        if errors:
            raise EngineUnavailable(errors[0])
        for w in warnings if runtime.is_rank0() else ():
            print(f"megammr: warning: {w}", flush=True)
        vllm = require_vllm()
        tp = recipe.rollout.tp or recipe.parallel.tp
        env = rt.env
        os.environ.update(launcher_env(env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port))
        llm = vllm.LLM(**llm_kwargs(recipe, rank=env.rank, tp=tp))
        tok = load_processor(recipe.model.hf_path).tokenizer
        eng = cls(llm, vllm.SamplingParams, stop_ids=stop_token_ids(recipe.model.hf_path, tok),
                  max_images=recipe.rollout.max_images, sleep_level=recipe.rollout.sleep_level, group=group,
                  leader=leader, is_leader=is_leader, vision_trainable=not recipe.model.freeze_vision)
        eng.sleep(level=2)  # dummy weights are worthless: give everything back until the first sync
        return eng

    # ------------------------------------------------------------------ memory
    def sleep(self, level: Optional[int] = None) -> None:
        level = self.sleep_level if level is None else level
        if self.asleep >= {"weights", "kv_cache"}:
            return  # already asleep (vLLM would only warn)
        # vLLM counts an engine with any tag still asleep as sleeping and ignores sleep(): wake
        # the rest first (e.g. a step that synced but generated nothing), then release it all.
        for tag in ("weights", "kv_cache"):
            self._wake(tag)
        self.llm.sleep(level=level)
        self.asleep = {"weights", "kv_cache"}
        if level >= 2:
            self.synced = False  # the weight memory is uninitialised after the next wake-up

    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)

    # ------------------------------------------------------------------ weight sync
    def _vllm_model(self):
        # In process (external_launcher): apply_model runs on this rank's own worker and returns
        # [model]; older layouts expose it through the driver worker.
        if hasattr(self.llm, "apply_model"):
            return self.llm.apply_model(lambda m: m)[0]
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model

    def begin_weight_update(self) -> None:
        """Wake the weights only (waking the KV cache too while the trainer's tensors are resident
        overflows memory: vLLM's reason for tags)."""
        self._wake("weights")
        self._model = self._vllm_model()
        self._loaded = set()

    def update_weights(self, named: Iterable) -> int:
        """Load one bucket of (HF checkpoint name, full tensor) pairs; returns the tensors given."""
        if self._model is None:
            self.begin_weight_update()
        named = list(named)
        loaded = self._model.load_weights(iter(named))
        self._loaded |= set(loaded or ())
        return len(named)

    def finish_weight_update(self) -> None:
        """process_weights_after_loading (a no-op for bf16, run as verl and NeMo-RL do), the
        coverage check, and the cache resets (old KV blocks and vision embeddings are stale)."""
        model, self._model = self._model, None
        if model is None:
            raise RuntimeError("finish_weight_update without a weight update")
        expected = {n for n, _ in model.named_parameters()}
        missing = sorted(expected - self._loaded)  # vLLM's own loader makes the same check after a load
        if missing:
            raise RuntimeError(f"weight sync left {len(missing)} vLLM parameters unwritten (they hold dummy or "
                               f"discarded values), e.g. {missing[:3]}: the exporter's HF names do not cover the model")
        self._process_after_loading(model)
        self.synced = True
        self.reset_caches()

    def _process_after_loading(self, model) -> None:
        try:
            from vllm.config import set_current_vllm_config
            from vllm.model_executor.model_loader.utils import process_weights_after_loading
        except ImportError:
            return  # stand-ins in tests; a vLLM without these has nothing to post-process for bf16
        cfg = self.llm.llm_engine.vllm_config
        with set_current_vllm_config(cfg):
            process_weights_after_loading(model, cfg.model_config, runtime.device())

    def reset_caches(self) -> None:
        ok = self.llm.reset_prefix_cache()
        if ok is False:
            raise RuntimeError("vLLM reset_prefix_cache() returned False (requests still running?): the prefix "
                               "cache would serve KV blocks of the old weights")
        engine = getattr(self.llm, "llm_engine", None)
        self.encoder_reset_available = False
        for name in ("reset_encoder_cache", "reset_mm_cache"):
            for obj in (self.llm, engine):
                fn = getattr(obj, name, None)
                if callable(fn):
                    fn()
                    self.encoder_reset_available |= name == "reset_encoder_cache"
                    break

    def weight_names(self) -> Optional[set[str]]:
        return None  # vLLM's parameters are fused (qkv_proj, gate_up_proj): coverage is checked per sync

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Any], n: int, sampling: SamplingParams) -> list[Rollout]:
        """Leader: send the call to the followers, then generate; identical inputs and seeds on
        every rank of the group give identical outputs."""
        if n < 1:
            raise ValueError("n must be >= 1")
        if sampling.seed is None and sampling.temperature > 0:
            sampling = SamplingParams(**{**vars(sampling), "seed": int(torch.randint(0, 2**62, (1,)).item())})
        plain = [RolloutPrompt(text=p.text, images=list(getattr(p, "images", None) or [])) for p in prompts]
        self._send(("generate", plain, n, sampling))
        return self._generate_here(plain, n, sampling)

    def _generate_here(self, prompts, n: int, sampling: SamplingParams) -> list[Rollout]:
        if not self.synced:
            raise RuntimeError("the vLLM engine has no weights (dummy at start, discarded by a level-2 sleep): "
                               "the trainer syncs before every rollout")
        if (self.vision_trainable and not self.encoder_reset_available
                and any(getattr(p, "images", None) for p in prompts)):
            raise EngineUnavailable("this vLLM has no reset_encoder_cache(): with a trained vision tower, cached "
                                    f"image embeddings would be stale (vLLM >= {MIN_VERSION}, or model.freeze_vision=true)")
        reqs = build_requests(prompts, self.max_images)
        params = [self.sampling_cls(**sampling_kwargs(
            sampling, n, None if sampling.seed is None else request_seed(sampling.seed, i), self.stop_ids))
            for i in range(len(reqs))]
        self._wake("kv_cache")
        outputs = self.llm.generate(reqs, params, use_tqdm=False)
        return extract_rollouts(outputs, n)

    # ------------------------------------------------------------------ the follower protocol
    def _send(self, payload) -> None:
        if self.is_leader and self._group_size() > 1:
            dist.broadcast_object_list([payload], src=self.leader, group=self.group)

    def _group_size(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None and dist.is_initialized() else 1

    def follow_rollouts(self) -> int:
        """Non-leader ranks: run the leader's generate calls until it finishes; returns how many."""
        calls = 0
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=self.leader, group=self.group)
            if box[0] is None:
                break
            _, prompts, n, sampling = box[0]
            self._generate_here(prompts, n, sampling)
            calls += 1
        self.sleep()
        return calls

    def finish_rollouts(self) -> None:
        """Leader: the step's generation is over: release the followers, then sleep."""
        self._send(None)
        self.sleep()


__all__ = ["EngineUnavailable", "INSTALL_HINT", "MAX_VERSION", "MIN_VERSION", "VLLMEngine", "VLLMFeatures",
           "build_requests", "extract_rollouts", "features_for", "launcher_env", "llm_kwargs", "request_seed",
           "require_vllm", "sampling_kwargs", "stop_token_ids", "token_logprobs", "version_problems",
           "vllm_version"]
