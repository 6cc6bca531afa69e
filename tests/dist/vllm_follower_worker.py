"""Worker: the colocated engine's follower protocol over a real process group (gloo, 2 ranks).

Rank 0 is the source (loader, reward pool, dynamic sampling with refill rounds); rank 1 holds only
its engine. Both run Experience.collect; vLLM is the stand-in of tests/unit/vllm_fakes.py. Prints
`RESULT {json}` on every rank: the generate calls its engine ran, the token ids it produced, and
its sleep state afterwards.
"""
import json
import os
import sys
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))
from vllm_fakes import FakeLLM, sampling_cls  # noqa: E402


class Loader:
    def __init__(self):
        self.n = 0

    def next_batch(self, k):
        out = []
        for _ in range(k):
            self.n += 1
            p = types.SimpleNamespace(input_ids=torch.tensor([1, 2]), pixel_values=None, image_grid_thw=None,
                                      text=f"q{self.n}", images=[])
            out.append(types.SimpleNamespace(key=f"s/{self.n}", answer="1", choices=None, prompt=p))
        return out


class Pool:
    def __init__(self):
        self.calls = 0

    def score(self, items):
        from megammr.rewards.core import RewardResult
        self.calls += 1  # the first round's groups are uniform (dropped): a second generate call follows
        return [RewardResult(reward=float(self.calls > 1 and i % 2)) for i in range(len(items))]


def main():
    from megammr.config import load_recipe
    from megammr.rollout.vllm_engine import VLLMEngine
    from megammr.train.experience import Experience

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    r = load_recipe("recipes/tiny/phase1.yaml", ["rollout.n=2", "train.prompts_per_step=2", "rollout.max_new_tokens=4",
                                                 "algo.dynamic_sampling=true", "algo.max_resample_rounds=2"])
    llm = FakeLLM(["model.embed_tokens.weight"])
    eng = VLLMEngine(llm, sampling_cls, stop_ids=[77], max_images=4, sleep_level=2, group=group, leader=0, is_leader=rank == 0)
    eng.sleep(2)
    eng.begin_weight_update()
    eng.update_weights([("model.embed_tokens.weight", None)])
    eng.finish_weight_update()
    exp = Experience(r, engine=eng, loader=Loader() if rank == 0 else None, pool=Pool() if rank == 0 else None,
                     dp_rank=0, dp_size=1, mp_group=group, src=0, is_src=rank == 0)
    llm.generated = []
    orig = llm.generate

    def recording(reqs, params, use_tqdm=True):
        outs = orig(reqs, params, use_tqdm)
        llm.generated.append([[list(o.token_ids) for o in ro.outputs] for ro in outs])
        return outs
    llm.generate = recording
    chunks, stats = exp.collect(1)
    print("RESULT " + json.dumps(dict(rank=rank, generated=llm.generated, groups=sum(len(c) for c in chunks),
                                      asleep=sorted(eng.asleep), extra_rounds=stats.extra_rounds)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
