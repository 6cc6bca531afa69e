"""Worker: after k GRPO updates and a weight sync, the rollout engine's logits equal Megatron's.

    torchrun --nproc-per-node N tests/dist/sync_worker.py RECIPE key=value ...

Uses the trainer's stages (setup.build, experience, train_on, WeightSync). The probe is a text and
a two-image prompt (megammr.models.parity.parity_inputs). Prints `RESULT {json}` on global rank 0.
"""
import json
from dataclasses import asdict
import sys

import torch
import torch.distributed as dist


def main():
    from megatron.core import parallel_state as ps

    from megammr import runtime
    from megammr.config import load_recipe
    from megammr.models.parity import megatron_logits, parity_inputs
    from megammr.train import setup
    from megammr.train.step import train_on
    from megammr.trainer import attach_logprobs, micro_batches

    r = load_recipe(sys.argv[1], sys.argv[2:])
    rt = runtime.init(r)
    torch.set_num_threads(1)
    parts = setup.build(r, rt)
    parts.sync.sync()
    before = {n: p.detach().clone() for n, p in parts.module.named_parameters()}
    for step in range(1, r.train.steps + 1):
        chunks, _ = parts.experience.collect(step)
        minis = micro_batches(parts, chunks)
        attach_logprobs(parts, minis)
        for mbs in minis:
            train_on(parts.model, parts.optimizer, mbs, r.algo, r.rollout.temperature)
        timings = parts.sync.sync()
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in parts.module.named_parameters())
    owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    last = [i for i in range(dist.get_world_size())]
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, owner)
    src = last[flags.index(True)]
    result = {}
    for name, inputs in parity_inputs(r.model.hf_path).items():
        got = megatron_logits(parts.module, inputs)
        box = [got if owner else None]
        dist.broadcast_object_list(box, src=src)
        if parts.engine is not None and dist.get_rank() == 0:
            with torch.no_grad():
                ref = parts.engine.model(**inputs).logits.float()
            result[name] = dict(max_abs_diff=float((box[0] - ref).abs().max()), ref_std=float(ref.std()))
    moved_all = torch.tensor([moved])
    dist.all_reduce(moved_all, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(dict(cases=result, weights_moved=float(moved_all), sync=asdict(timings))), flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
