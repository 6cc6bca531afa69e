"""Reading checkpoints into a model: the error every checkpoint reader raises, and the load of a
torch_dist checkpoint (the converter's or a trainer's) into this rank's model at any TP/PP.

`CheckpointError` lives here, below mapping.py and convert.py, because both raise it and
convert.py imports mapping.py (so neither can own it without a cycle); train/checkpoint.py, the
`megammr train` entry point and tools/convert_checkpoint.py import it from here too.
`load_mcore_checkpoint` is how every phase starts from the previous one (train/setup.py); the
parity worker (models/parity.py) checks the same function against transformers.
"""
from __future__ import annotations

# lazy in this module: megatron-core and torch.distributed.checkpoint (~3 s of imports together).
# `megammr train` imports CheckpointError from here while it checks a recipe, and a recipe error
# exits before either is imported.


class CheckpointError(RuntimeError):
    """A wrong or incomplete checkpoint; the message names the file and tensor."""


def load_mcore_checkpoint(model, ckpt_dir: str) -> None:
    """Load a torch_dist checkpoint into this rank's model (any TP/PP).

    `_extra_state` objects missing from the checkpoint are skipped: checkpoints written by the
    converter carry weights only, and TE's FP8 metadata starts fresh.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint import FileSystemReader

    sd = model.sharded_state_dict()
    stored = set(FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata.keys())
    sd = {k: v for k, v in sd.items() if not (isinstance(v, ShardedObject) and v.unique_key not in stored)}
    state = dist_checkpointing.load(sd, ckpt_dir)
    # A trainer checkpoint also holds the optimizer's common state: this loads the model only.
    state = {k: v for k, v in state.items() if k in sd}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt_dir}: missing {missing[:5]} unexpected {unexpected[:5]}")


__all__ = ["CheckpointError", "load_mcore_checkpoint"]
