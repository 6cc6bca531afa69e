"""Packed-vs-padded cases shared by tests/unit/test_packing.py (CPU) and tests/gpu (GPU, TE):
text and image samples of uneven lengths, and the trainer's log-probs of them both ways."""
import torch


def packing_samples(bb, seed: int = 0):
    """Text and image (prompt, response) samples of uneven lengths for packed-vs-padded checks."""
    from megammr.train.batching import Sample
    g = torch.Generator().manual_seed(seed)
    img, grid = bb.image_token_id, torch.tensor([[1, 4, 4]])  # 4 merged image tokens
    px = torch.randn(16, bb.vision.in_channels * bb.vision.temporal_patch_size * bb.vision.patch_size ** 2, generator=g)

    def rnd(n):
        return torch.randint(10, min(300, bb.vocab_size), (n,), generator=g).tolist()
    return [Sample(rnd(3) + [img] * 4 + rnd(2), rnd(7), 1.0, [-1.0] * 7, px, grid),
            Sample(rnd(5), rnd(21), -1.0, [-1.0] * 21),
            Sample(rnd(2) + [img] * 4, rnd(3), 0.5, [-1.0] * 3, px * 0.5, grid),
            Sample(rnd(9), rnd(1), 0.0, [-1.0])]


def packed_vs_padded_logprobs(model, samples, multiple: int = 1):
    """The trainer's forward-only log-probs of `samples` through padded rows and through one packed
    (THD) micro-batch: two lists of per-sample response log-prob tensors (float32, CPU), and the
    packed micro-batch."""
    from megammr.train.batching import make_micro_batches, make_packed_micro_batches
    from megammr.train.step import forward_logprobs
    bb = model.backbone
    padded = make_micro_batches(samples, bb, pad_id=0, micro_batch_size=len(samples))
    packed = make_packed_micro_batches(samples, bb, pad_id=0, micro_batch_size=len(samples), multiple=multiple)
    (lp_pad,), (lp_pack,) = forward_logprobs(model, padded, 1.0), forward_logprobs(model, packed, 1.0)
    a, b = [], []
    for k, i in enumerate(packed[0].rows):
        start, r = int(packed[0].cu_seqlens_padded[k]), padded[0].rows.index(i)
        n = samples[i].length
        m = padded[0].loss_mask[r, :n].bool().to(lp_pad.device)
        a.append(lp_pad[r, :n][m].float().cpu())
        b.append(lp_pack[0, start:start + n][m].float().cpu())
        assert b[-1].numel() == len(samples[i].response_ids)
    return a, b, packed[0]
