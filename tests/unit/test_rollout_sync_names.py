"""Weight sync into the transformers engine under HF checkpoint names (what the trainer streams)."""
import pytest
import torch
from PIL import Image

from megammr.data.prompts import encode_prompt
from megammr.models.mapping import (DEC, HFReader, global_nonlayer_keys, hf_layer_to_global, iter_hf_from_global,
                                    normalize_hf_name)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_dir(request, tmp_path_factory):
    from megammr.models.tiny import write_tiny_model
    return write_tiny_model(str(tmp_path_factory.mktemp("tinyvl")), seed=0, tie_word_embeddings=request.param)


def _logits(eng):
    img = Image.new("RGB", (84, 56), (10, 120, 200))
    p = encode_prompt("What is shown?", style="image", images=[img], tokenizer=eng.tokenizer)
    enc = eng.processor(text=[p.text], images=[img], return_tensors="pt")
    with torch.no_grad():
        return eng.model(**enc).logits


def test_sync_under_checkpoint_names(tiny_dir):
    from megammr.rollout import TransformersEngine
    eng = TransformersEngine.from_pretrained(tiny_dir, max_batch_sequences=16)
    reader = HFReader(tiny_dir)
    tied = reader.backbone.tie_word_embeddings
    original = {n: reader.get(n) for n in reader.files}
    assert eng.weight_names() == set(original)
    assert ("lm_head.weight" in eng.weight_names()) == (not tied)

    perturbed = {n: t + 0.01 for n, t in original.items()}
    assert eng.update_weights(perturbed.items()) == len(perturbed)
    loaded = {normalize_hf_name(n): p for n, p in eng.model.named_parameters()}
    assert set(loaded) == set(perturbed)
    for n, t in perturbed.items():
        assert torch.equal(loaded[n].detach(), t), n
    head, emb = eng.model.lm_head.weight, eng.model.model.language_model.embed_tokens.weight
    if tied:  # the output layer shares the embedding's storage, so it followed the sync
        assert head.data_ptr() == emb.data_ptr()
        assert torch.equal(head.detach(), perturbed["model.embed_tokens.weight"])
    else:
        assert head.data_ptr() != emb.data_ptr()

    # loading the original tensors back gives a freshly loaded model's logits
    assert eng.update_weights(original.items()) == len(original)
    fresh = TransformersEngine.from_pretrained(tiny_dir, max_batch_sequences=16)
    assert torch.equal(_logits(eng), _logits(fresh))


def test_names_from_megatron_mapping_cover_the_engine(tiny_dir):
    """iter_hf_from_global (the trainer's sync stream) yields exactly weight_names()."""
    from megammr.rollout import TransformersEngine
    eng = TransformersEngine.from_pretrained(tiny_dir, max_batch_sequences=16)
    reader = HFReader(tiny_dir)
    bb = reader.backbone
    hf_of = global_nonlayer_keys(bb)

    def get_global(key, layer):
        if layer is None:
            return reader.get(hf_of[key])
        return hf_layer_to_global(reader.get, bb, layer, key[len(DEC):])

    stream = list(iter_hf_from_global(get_global, bb))
    assert {n for n, _ in stream} == eng.weight_names() and len(stream) == len(eng.weight_names())
    assert eng.update_weights(stream) == len(stream)


def test_in_memory_names_and_errors(tiny_dir):
    from megammr.rollout import TransformersEngine
    eng = TransformersEngine.from_pretrained(tiny_dir, max_batch_sequences=16)
    params = dict(eng.model.named_parameters())
    names = [n for n in params if n.startswith("model.language_model.layers.0.")][:1] + \
            [n for n in params if n.startswith("model.visual.blocks.0.")][:1]
    assert len(names) == 2
    assert eng.update_weights([(n, torch.zeros_like(params[n])) for n in names]) == 2
    assert all(float(params[n].detach().abs().sum()) == 0.0 for n in names)
    with pytest.raises(KeyError, match="model.layers.99.mlp.up_proj.weight"):
        eng.update_weights([("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])
    if "lm_head.weight" not in eng.weight_names():  # tied: sync the embedding instead
        with pytest.raises(KeyError, match="lm_head.weight.*tied"):
            eng.update_weights([("lm_head.weight", torch.zeros_like(eng.model.lm_head.weight))])
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights([("model.norm.weight", torch.zeros(1))])


def test_sync_reads_the_norms_under_either_layer_spec(tiny_dir):
    """The local spec keeps a layer's norms as modules of their own (input_layernorm.weight); TE's
    fused LayerNormLinear holds them as self_attention.linear_qkv.layer_norm_weight. The sync reads
    whichever the model has (a TE-spec model used to fail with KeyError on the local names)."""
    from megammr.models.mapping import LAYER_KEYS
    from megammr.train.sync import tensor_order
    bb = HFReader(tiny_dir).backbone
    te = set(LAYER_KEYS) | {"self_attention.linear_qkv._extra_state", "mlp.linear_fc1._extra_state"}
    local = (set(LAYER_KEYS) - {"self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"}) \
        | {"input_layernorm.weight", "pre_mlp_layernorm.weight"}
    for names, norm in ((te, "self_attention.linear_qkv.layer_norm_weight"), (local, "input_layernorm.weight"),
                        (None, "input_layernorm.weight")):
        order = tensor_order(bb, names)
        per_layer = [s for s, layer, _ in order if layer == 0]
        assert norm in per_layer and len(per_layer) == len(LAYER_KEYS)
        if names is not None:
            assert set(per_layer) <= names  # every name the sync reads exists in the model
        assert [k for _, layer, k in order if layer == 0] == list(LAYER_KEYS)  # same HF tensors either way
    with pytest.raises(KeyError, match="neither input_layernorm.weight nor"):
        tensor_order(bb, local - {"input_layernorm.weight"})
