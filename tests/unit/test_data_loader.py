"""The energon phase loader: exact resume, DP splitting, seeds, blends, state and config errors."""
import collections
import io

import pytest
import torch

from megammr.config import DataConfig, DatasetConfig
from megammr.data.loader import DataConfigError, DataStateError, PhaseDataLoader

from megammr.data.shards import build_shards
from megammr.data.synthetic import write_phase
from record_helpers import tiny_processor, tiny_tokenizer  # noqa: F401 (fixtures)

N = 48
_OPEN = []


def L(*args, **kw):
    """A loader closed at the end of the test: left to the garbage collector, a loader with worker
    processes costs torch's 5 s shutdown timeout per worker (see PhaseDataLoader.close)."""
    ld = PhaseDataLoader(*args, **kw)
    _OPEN.append(ld)
    return ld


@pytest.fixture(autouse=True)
def _close_loaders():
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = {}
    for phase in (1, 2, 3):
        jsonl = write_phase(str(root / "raw"), phase, N, seed=1)
        out[phase] = str(root / f"phase{phase}")
        build_shards([jsonl], phase, out[phase], shard_max_samples=6, progress=False)
    return out


def _cfg(paths, style="image", weights=None, **kw):
    weights = weights or [1.0] * len(paths)
    return DataConfig(datasets=[DatasetConfig(path=p, weight=w) for p, w in zip(paths, weights)],
                      prompt_style=style, shuffle_buffer_size=8, max_samples_per_sequence=4, **kw)


def _roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("num_workers,blend", [(0, False), (2, False), (2, True)])
def test_restored_loader_yields_exactly_what_uninterrupted_would(shards, num_workers, blend):
    paths = [shards[2], shards[3]] if blend else [shards[3]]
    cfg = _cfg(paths, num_workers=num_workers, weights=[0.3, 0.7] if blend else None)
    a = L(cfg, seed=7)
    first = a.next_batch(9)
    state = _roundtrip(a.state_dict())
    ref = a.next_batch(30)  # runs past one epoch of each worker's share: repeat and reshuffle included
    b = L(cfg, seed=7)
    b.load_state_dict(state)
    got = b.next_batch(30)
    assert [s.key for s in got] == [s.key for s in ref]
    assert [s.id for s in got] == [s.id for s in ref]
    for x, y in zip(got, ref):
        assert torch.equal(x.prompt.pixel_values, y.prompt.pixel_values) and x.prompt.text == y.prompt.text
    # Fresh loader with the same seed replays the same stream from the start.
    c = L(cfg, seed=7)
    assert [s.key for s in c.next_batch(39)] == [s.key for s in first + ref]
    if blend:
        assert {s.phase for s in first + ref} == {2, 3}


def test_seed_changes_order_only(shards):
    cfg = _cfg([shards[1]], style="text", num_workers=0)
    ids = [[s.id for s in L(cfg, seed=seed, repeat=False).next_batch(N)] for seed in (1, 1, 2)]
    assert ids[0] == ids[1] and ids[0] != ids[2] and sorted(ids[0]) == sorted(ids[2])
    assert len(set(ids[0])) == N


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dp_ranks_split_without_overlap(shards, num_workers):
    cfg = _cfg([shards[3]], num_workers=num_workers)
    per_rank = [[s.id for s in L(cfg, seed=3, dp_rank=r, dp_size=2, repeat=False).next_batch(10 * N)]
                for r in range(2)]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"synthetic-p3-{i:06d}" for i in range(N))


def test_blend_weights(shards):
    cfg = _cfg([shards[2], shards[3]], weights=[1.0, 3.0], num_workers=0)
    c = collections.Counter(s.phase for s in L(cfg, seed=0).next_batch(200))
    assert 0.15 < c[2] / 200 < 0.35, c


def test_state_mismatch_is_a_clear_error(shards):
    cfg2 = _cfg([shards[3]], num_workers=2)
    a = L(cfg2, seed=7)
    a.next_batch(3)
    state = a.state_dict()
    b = L(_cfg([shards[3]], num_workers=1), seed=7)
    with pytest.raises(DataStateError, match=r"num_workers: saved 2, now 1"):
        b.load_state_dict(state)
    c = L(cfg2, seed=7, dp_rank=1, dp_size=2)
    with pytest.raises(DataStateError, match=r"dp_rank: saved 0, now 1.*dp_size: saved 1, now 2"):
        c.load_state_dict(state)
    # Bypassing our own check still gives a clear error, not energon's bare AssertionError.
    d = L(_cfg([shards[3]], num_workers=1), seed=7)
    with pytest.raises(DataStateError, match="energon refused"):
        d.load_state_dict({**state, "num_workers": 1})
    a.next_batch(1)
    with pytest.raises(DataStateError, match="before the loader is iterated"):
        a.load_state_dict(state)


def test_style_must_fit_the_shards(shards, tmp_path):
    with pytest.raises(DataConfigError, match="built as phase 3 data, which prompt_style 'caption' cannot use"):
        L(_cfg([shards[3]], style="caption"), seed=0)
    with pytest.raises(DataConfigError, match="built as phase 2 data, which prompt_style 'text'"):
        L(_cfg([shards[2]], style="text"), seed=0)
    with pytest.raises(DataConfigError, match=r"data.datasets\[0\].path: .*no .nv-meta"):
        L(_cfg([str(tmp_path)]), seed=0)
    with pytest.raises(DataConfigError, match="data.datasets is empty"):
        L(DataConfig(), seed=0)


def test_caption_prompts_and_too_long_skips(shards, tiny_tokenizer):
    cfg = _cfg([shards[2]], style="caption", num_workers=0)
    s = L(cfg, seed=0, tokenizer=tiny_tokenizer).next_batch(1)[0]
    assert "Image description: " + s.caption in s.prompt.text and s.prompt.text.count("<|image_pad|>") == 1
    n_pad = int((s.prompt.input_ids == tiny_tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n_pad == int(s.prompt.image_grid_thw.prod()) // 4 and s.prompt.pixel_values.shape[0] == 4 * n_pad
    # Text prompts differ in length: a limit between shortest and longest skips some, counted.
    lens = sorted(x.prompt.num_tokens for x in L(_cfg([shards[1]], style="text", num_workers=0),
                                                               seed=0, tokenizer=tiny_tokenizer, repeat=False).next_batch(N))
    limit = lens[N // 2]
    ld = L(_cfg([shards[1]], style="text", num_workers=0, max_prompt_tokens=limit), seed=0,
                         tokenizer=tiny_tokenizer, repeat=False)
    kept = ld.next_batch(N)
    assert all(x.prompt.num_tokens <= limit for x in kept)
    assert ld.skipped["too_long"] == N - len(kept) == sum(x > limit for x in lens) > 0
    assert ld.state_dict()["skipped"] == {"too_long": N - len(kept)}
