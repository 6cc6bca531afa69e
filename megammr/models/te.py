"""TransformerEngine and FP8: the feature checks and the TransformerConfig fields, in one place.

TE cannot be imported without CUDA, so nothing here imports it at module import: `te_version()`
reads the installed distribution's metadata, `require_te()` imports it when a run asks for the TE
layer spec. The FP8 rules below follow megatron-core 0.16's TransformerConfig and fp8_utils
(identical in 0.19) and TE's recipe classes:

- `fp8` format: "hybrid" (e4m3 forward, e5m2 gradients) for delayed scaling, as Megatron's own
  delayed-scaling example; "e4m3" for the current-scaling recipes (tensorwise, blockwise, mxfp8).
- delayed scaling uses an amax history (1024, "max"), and cannot keep layers in BF16;
  the other recipes wrap each layer in its own autocast, so the first and last decoder layers stay
  BF16 (`first_last_layers_bf16`) when the model has more than two layers per pipeline stage.
- `fp8_param=False`: weights stay BF16 tensors, so the weight sync into vLLM is unchanged.
- TE versions per recipe (megatron's get_fp8_recipe): tensorwise >= 2.2, blockwise >= 2.3,
  mxfp8 >= 2.1; blockwise needs Hopper (sm90) and CUDA >= 12.9, mxfp8 Blackwell (sm100+).
- FP8 GEMMs need their dimensions divisible by 16: hidden, ffn / tp and the fused QKV width / tp;
  the token count of a micro-batch is padded to `fp8_pad_multiple` (megatron's get_fp8_align_size).
The vision tower is this project's own torch module (megammr.models.vision), outside the decoder's
FP8 autocast: it always runs in BF16 (its MLP width 3420 is not a multiple of 16 anyway).
"""
from __future__ import annotations

import os
from typing import Optional

from megammr.versions import installed_version, version_at_least

INSTALL_HINT = 'pip install -e ".[gpu]"'
# (minimum TE version, compute capability range [lo, hi) or None) per megatron fp8_recipe
FP8_RECIPES = {
    "delayed": ("1.0", None),
    "tensorwise": ("2.2", None),
    "blockwise": ("2.3", ((9, 0), (10, 0))),
    "mxfp8": ("2.1", ((10, 0), (99, 0))),
}
FP8_AMAX_HISTORY = 1024


def te_version() -> Optional[str]:
    """The installed transformer-engine version (metadata only: nothing is imported), or None."""
    return installed_version("transformer-engine", "transformer_engine", "transformer-engine-torch")


def require_te():
    """Import transformer_engine, or a one-line RuntimeError naming the extra to install."""
    try:  # lazy: TE is an optional GPU extra and cannot be imported without CUDA
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or an OSError from its CUDA libraries
        raise RuntimeError(f"model.layer_spec=te needs transformer-engine[pytorch] and a GPU ({INSTALL_HINT}; "
                           f"import failed: {type(e).__name__}: {e}); use model.layer_spec=local on CPU") from None
    return transformer_engine


def fp8_config_fields(precision: str, fp8_recipe: str, num_layers: int, pp: int) -> dict:
    """TransformerConfig keyword arguments for `precision` (empty unless it is fp8)."""
    if precision != "fp8":
        return {}
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe={fp8_recipe!r}: expected one of {', '.join(FP8_RECIPES)}")
    kw = dict(fp8="hybrid" if fp8_recipe == "delayed" else "e4m3", fp8_recipe=fp8_recipe, fp8_param=False)
    if fp8_recipe == "delayed":
        kw.update(fp8_amax_history_len=FP8_AMAX_HISTORY, fp8_amax_compute_algo="max")
    elif num_layers // max(pp, 1) > 2:
        # megatron counts these per pipeline stage: the first and last layer of the model stay BF16
        kw.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    return kw


def fp8_pad_multiple(fp8_recipe: Optional[str]) -> int:
    """Token-count multiple an FP8 GEMM input needs (megatron's get_fp8_align_size)."""
    return 32 if fp8_recipe == "mxfp8" else 16


def fp8_shape_problems(bb, tp: int) -> list[str]:
    """Decoder widths that FP8 GEMMs reject at this tensor-parallel size."""
    qkv = bb.head_dim * (bb.num_heads + 2 * bb.num_kv_heads)
    dims = {"hidden_size": bb.hidden_size, f"intermediate_size / tp ({tp})": bb.intermediate_size // tp,
            f"fused QKV width / tp ({tp})": qkv // tp}
    return [f"{name} = {d} is not a multiple of 16" for name, d in dims.items() if d % 16]


def fp8_problems(fp8_recipe: str, te_ver: Optional[str], capability: Optional[tuple[int, int]],
                 cuda_version: Optional[str]) -> list[str]:
    """Why model.precision=fp8 with `fp8_recipe` cannot run here (empty when it can)."""
    if fp8_recipe not in FP8_RECIPES:
        return [f"model.fp8_recipe={fp8_recipe!r} is not one of {', '.join(FP8_RECIPES)}"]
    minimum, caps = FP8_RECIPES[fp8_recipe]
    out = []
    if te_ver is None:
        out.append(f"model.precision=fp8 needs transformer-engine[pytorch] ({INSTALL_HINT})")
    elif not version_at_least(te_ver, minimum):
        out.append(f"model.fp8_recipe={fp8_recipe} needs transformer-engine >= {minimum} (found {te_ver})")
    if capability is None:
        out.append("model.precision=fp8 needs a CUDA GPU")
    else:
        if tuple(capability) < (8, 9):
            out.append(f"model.precision=fp8 needs an FP8 GPU (compute capability >= 8.9, found "
                       f"{capability[0]}.{capability[1]})")
        elif caps and not caps[0] <= tuple(capability) < caps[1]:
            where = "Hopper (sm90)" if fp8_recipe == "blockwise" else "Blackwell (sm100 or newer)"
            out.append(f"model.fp8_recipe={fp8_recipe} runs on {where} only (found sm{capability[0]}{capability[1]}); "
                       "use tensorwise or delayed")
    if fp8_recipe == "blockwise" and cuda_version is not None and not version_at_least(cuda_version, "12.9"):
        out.append(f"model.fp8_recipe=blockwise needs CUDA >= 12.9 (torch was built with {cuda_version})")
    return out


def prepare_fp8_env(fp8_recipe: str, environ=None) -> None:
    """Environment TE reads when it initialises: blockwise scaling wants FP32 scales (as slime and
    verl set it); set before TE builds its first FP8 tensor, never overriding the user's choice."""
    env = os.environ if environ is None else environ
    if fp8_recipe == "blockwise":
        env.setdefault("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "1")


__all__ = ["FP8_RECIPES", "INSTALL_HINT", "fp8_config_fields", "fp8_pad_multiple", "fp8_problems",
           "fp8_shape_problems", "prepare_fp8_env", "require_te", "te_version"]
