"""Unit tests of the trainer's stages that need no process group: micro-batching, overlong
shaping, dynamic sampling, replay splitting and the recipe checks."""
import types

import pytest
import torch

from megammr.config import RecipeError, load_recipe
from megammr.rollout.base import RolloutEngine
from megammr.backbones import get_backbone
from megammr.train.batching import IGNORE, Sample, make_micro_batches, plan_micro_batches
from megammr.train.experience import Experience, Group, _split, overlong_penalty, sampling_seed
from megammr.train.setup import check_recipe

BB = get_backbone("tiny")


def sample(p, r, adv=1.0):
    return Sample(list(range(10, 10 + p)), list(range(100, 100 + r)), adv, [-0.5] * r)


def test_labels_and_mask_cover_exactly_the_response():
    s = sample(5, 3)
    (mb,) = make_micro_batches([s], BB, pad_id=0, micro_batch_size=4)
    assert mb.shape == (1, 7)  # prompt + response - 1
    assert mb.input_ids[0].tolist() == (s.prompt_ids + s.response_ids)[:-1]
    # position 4 (last prompt token) predicts response token 0, ... position 6 predicts token 2
    assert mb.labels[0].tolist() == [IGNORE] * 4 + s.response_ids
    assert mb.loss_mask[0].tolist() == [0.0] * 4 + [1.0] * 3
    assert mb.rollout_logp[0, 4:].tolist() == [-0.5] * 3


def test_token_budget_groups_by_length_and_pads_right():
    lengths = [50, 10, 40, 12, 11]
    plans = plan_micro_batches(lengths, micro_batch_size=8, max_tokens=100, fixed_shape=False)
    assert plans == [[0, 2], [3, 4, 1]]  # longest first; rows x longest <= 100
    assert sorted(i for p in plans for i in p) == list(range(5))
    samples = [sample(4, n - 3) for n in lengths]
    mbs = make_micro_batches(samples, BB, pad_id=7, micro_batch_size=8, max_tokens=100)
    assert [mb.shape for mb in mbs] == [(2, 50), (3, 12)]
    short = mbs[1]
    row = short.rows.index(1)  # the length-10 sample, padded on the right to 12
    assert short.input_ids[row, 10:].tolist() == [7, 7] and short.loss_mask[row, 10:].sum() == 0


def test_fixed_shapes_under_pipeline_parallelism():
    samples = [sample(4, n) for n in (5, 9, 3)]
    mbs = make_micro_batches(samples, BB, pad_id=0, micro_batch_size=2, fixed_shape=True)
    assert [mb.shape for mb in mbs] == [(2, 12), (2, 12)]
    assert mbs[1].rows[-1] == -1 and mbs[1].loss_mask[1].sum() == 0  # a masked filler row


def test_image_samples_keep_their_pixels_in_row_order():
    from megammr.data.images import preprocess_images
    from PIL import Image
    ii = preprocess_images([Image.new("RGB", (56, 56))], 3136, 1003520)
    n_img = ii.num_tokens(2)[0]
    prompt = [1, BB.vision_start_token_id] + [BB.image_token_id] * n_img + [BB.vision_end_token_id, 2]
    s = Sample(prompt, [5, 6], 1.0, [0.0, 0.0], torch.from_numpy(ii.pixel_values), torch.from_numpy(ii.image_grid_thw))
    (mb,) = make_micro_batches([s, sample(3, 2)], BB, pad_id=0, micro_batch_size=2)
    assert mb.pixel_values.shape[0] == ii.pixel_values.shape[0] and mb.image_grid_thw.tolist() == [[1, 4, 4]]
    assert mb.position_ids.shape == (3, 2, mb.shape[1])


def test_empty_response_is_an_error():
    with pytest.raises(ValueError, match="empty response"):
        make_micro_batches([sample(3, 0)], BB, pad_id=0, micro_batch_size=1)


def test_overlong_penalty():
    assert overlong_penalty(10, 32, 0, 1.0) == 0.0
    assert overlong_penalty(24, 32, 8, 1.0) == 0.0
    assert overlong_penalty(28, 32, 8, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(32, 32, 8, 0.5) == pytest.approx(-0.5)


def test_sampling_seed_differs_by_step_rank_round():
    seeds = {sampling_seed(1, s, r, k) for s in range(3) for r in range(2) for k in range(2)}
    assert len(seeds) == 12 and sampling_seed(1, 2, 1, 0) == sampling_seed(1, 2, 1, 0)


def test_split_is_even_and_ordered():
    assert _split(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert _split([], 3) == [[], [], []]


class FakeLoader:
    def __init__(self):
        self.n = 0

    def next_batch(self, k):
        out = []
        for _ in range(k):
            self.n += 1
            p = types.SimpleNamespace(input_ids=torch.tensor([1, 2, 3]), pixel_values=None, image_grid_thw=None,
                                      text="q", images=[])
            out.append(types.SimpleNamespace(key=f"s/{self.n}", answer=str(self.n % 2), choices=None, prompt=p))
        return out


class FakeEngine(RolloutEngine):
    """Prompt k answers '1' in every sample when k is odd, mixed answers when k is even."""

    def generate(self, prompts, n, sp):
        from megammr.rollout.base import Rollout
        return [Rollout(i, j, "x", [7, 8], [-1.0, -1.0], "stop", [1, 2, 3]) for i in range(len(prompts)) for j in range(n)]


class FakePool:
    def __init__(self):
        self.calls = 0

    def score(self, items):
        from megammr.rewards.core import RewardResult
        self.calls += 1
        # first call: every group all-equal (dropped); later calls: alternating rewards
        return [RewardResult(reward=float(self.calls > 1 and i % 2)) for i in range(len(items))]


def experience(overrides):
    r = load_recipe("recipes/tiny/phase1.yaml", ["rollout.n=2", "train.prompts_per_step=2"] + overrides)
    return Experience(r, engine=FakeEngine(), loader=FakeLoader(), pool=FakePool(), dp_rank=0, dp_size=1,
                      mp_group=None, src=0, is_src=True)


def test_dynamic_sampling_drops_uniform_groups_and_refills():
    exp = experience(["algo.dynamic_sampling=true", "algo.max_resample_rounds=2"])
    chunks, stats = exp._collect_here(1)
    groups = [g for c in chunks for g in c]
    assert len(groups) == 2 and stats.groups_dropped == 2 and stats.extra_rounds == 1
    assert all(len(set(g.rewards)) > 1 for g in groups)


def test_dynamic_sampling_is_bounded():
    exp = experience(["algo.dynamic_sampling=true", "algo.max_resample_rounds=0"])
    chunks, stats = exp._collect_here(1)
    assert sum(len(c) for c in chunks) == 0 and stats.groups_dropped == 2  # trains on fewer groups, counted


def test_vision_tokens_in_a_response_drop_the_sample():
    exp = experience([])
    exp.vision_token_ids = {8}
    chunks, stats = exp._collect_here(1)
    assert sum(len(c) for c in chunks) == 0 and stats.vision_token_responses == 4


@pytest.mark.parametrize("override,needle", [
    ("parallel.cp=2", "context parallelism"),
    ("rollout.gpu_memory_utilization=0.9", "rollout.gpu_memory_utilization is a vLLM setting"),
    ("rollout.engine=vllm", "rollout.engine=vllm"),
    ("model.hf_path=null", "model.hf_path is required"),
    ("rollout.replay=/nonexistent", "no such directory"),
    ("train.prompts_per_step=3", "does not split over 2 data-parallel ranks"),
    ("train.offload_during_rollout=true optim.distributed_optimizer=true model.precision=fp32",
     "cannot move to the CPU"),
])
def test_unhonourable_fields_are_errors(override, needle, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = load_recipe("recipes/tiny/phase1.yaml", [f"model.hf_path={tmp_path}", *override.split()])
    with pytest.raises(RecipeError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        check_recipe(r, world_size=2, cuda=False)


def test_groups_are_plain_data():
    import dataclasses
    g = Group("k", "1", [1], None, None, [[2]], [[-1.0]], ["stop"], ["x"], [1.0], [1.0], [1.0])
    assert dataclasses.asdict(g)["token_ids"] == [[2]]
