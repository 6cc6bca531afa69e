"""The supervised format warm-up of a tiny HF model (megammr.warmup)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megammr.models.tiny import write_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECORDS = [
    {"question": "Compute 38 - 29 * 3.", "answer": "B", "choices": ["-65", "-49", "-42", "-33"]},
    {"question": "Compute 59 - 28 * 8.", "answer": "-165"},
    {"question": "A notebook costs 12 dollars. Tom buys 2 notebooks and pays with 50 dollars. "
                 "How much change does he get?", "answer": "26"},
    {"question": "Mia has 5 apples. She buys 5 bags with 3 apples in each bag, then gives away 3 apples. "
                 "How many apples does she have now?", "answer": "17"},
]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("warmup")
    model = write_tiny_model(str(d / "random"), seed=0)
    jsonl = d / "phase1.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return d, model, str(jsonl)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def test_demonstration_is_the_trainer_prompt_plus_a_formatted_response(src):
    from megammr.data.prompts import encode_prompt
    from megammr.models.processor import load_processor
    from megammr.warmup import demonstration, response_text
    from megammr.rewards.extract import format_ok

    _, model, _ = src
    tok = load_processor(model).tokenizer
    prompt, resp = demonstration(RECORDS[0], tok)
    assert prompt == encode_prompt(RECORDS[0]["question"], style="text", choices=RECORDS[0]["choices"],
                                   tokenizer=tok).input_ids.tolist()
    assert resp[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    text = tok.decode(resp, skip_special_tokens=True)
    assert text == response_text("B") and format_ok(text, require_think=True)
    assert len(resp) <= 40  # fits the tiny recipes' rollout budget with room to spare


def test_warmup_output_loads_validates_and_learns(src):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megammr.models.mapping import HFReader
    from megammr.models.processor import load_processor
    from megammr.warmup import format_warmup

    d, model, jsonl = src
    out = str(d / "warm")
    res = format_warmup(model, out, jsonl, steps=6, lr=3e-3, batch_size=4, seed=0)
    assert res.last_loss < res.first_loss
    r = HFReader(out)
    r.validate()
    assert r.backbone.vocab_size == HFReader(model).backbone.vocab_size
    proc = load_processor(out)
    assert proc.tokenizer("<think>")["input_ids"] == load_processor(model).tokenizer("<think>")["input_ids"]
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    sd = m.state_dict()
    w = _weights(out)
    assert torch.equal(w["model.embed_tokens.weight"], sd["model.language_model.embed_tokens.weight"])
    # The weights moved (the text decoder trained) and stay finite.
    w0 = _weights(model)
    assert not torch.equal(w["model.layers.0.self_attn.q_proj.weight"], w0["model.layers.0.self_attn.q_proj.weight"])
    assert all(torch.isfinite(t).all() for t in w.values())
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(model, name), "rb").read()
    assert json.load(open(os.path.join(out, "format_warmup.json")))["steps"] == 6


def test_warmup_is_deterministic_by_seed(src):
    from megammr.warmup import format_warmup

    d, model, jsonl = src
    a = format_warmup(model, str(d / "a"), jsonl, steps=3, batch_size=2, seed=1)
    b = format_warmup(model, str(d / "b"), jsonl, steps=3, batch_size=2, seed=1)
    c = format_warmup(model, str(d / "c"), jsonl, steps=3, batch_size=2, seed=2)
    wa, wb, wc = _weights(a.out_dir), _weights(b.out_dir), _weights(c.out_dir)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # another seed: another data order


def test_warmup_refuses_to_overwrite_its_source(src):
    from megammr.warmup import format_warmup

    _, model, jsonl = src
    with pytest.raises(ValueError, match="differ"):
        format_warmup(model, model, jsonl, steps=1)


def test_make_tiny_model_format_warmup_option(src, tmp_path):
    _, _, jsonl = src
    out = tmp_path / "tiny-warm"
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_tiny_model.py"), "--out", str(out),
                        "--format-warmup", jsonl, "--warmup-steps", "2"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == str(out)
    from megammr.models.mapping import HFReader
    HFReader(str(out)).validate()
    assert json.load(open(out / "format_warmup.json"))["steps"] == 2
    assert not any(n.startswith("random") or os.path.isdir(out / n) for n in os.listdir(out))
    # Without --format-warmup the warm-up options are refused (nothing to apply them to).
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_tiny_model.py"), "--out",
                        str(tmp_path / "x"), "--warmup-steps", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--format-warmup" in p.stderr
