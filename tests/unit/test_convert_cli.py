"""convert_checkpoint.py check resolves relative paths before handing them to torchrun workers
(which run from the repository root) and rejects a missing directory up front."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_check_rejects_missing_relative_dir(tmp_path):
    (tmp_path / "ck").mkdir()
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "check",
                        "--hf", "nope", "--ckpt", "ck"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2
    assert f"--hf {tmp_path / 'nope'} is not a directory" in p.stderr


def _tiny_and_ckpt(root, tied=True):
    from megammr.models.convert import hf_to_mcore
    from megammr.models.tiny import write_tiny_model
    hf = write_tiny_model(str(root / ("hf" if tied else "hf_untied")), seed=1, tie_word_embeddings=tied)
    ck = str(root / ("ck" if tied else "ck_untied"))
    hf_to_mcore(hf, ck)
    return hf, ck


def _config_copy(src, dst, **changes):
    import json
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_mcore_to_hf_rejects_a_checkpoint_of_another_backbone(tmp_path):
    """A config with fewer layers exported a truncated model; an untied lm_head under a tied config
    was dropped; a wider config failed half-way and left OUT.tmp behind. All fail up front now."""
    import pytest

    from megammr.models.convert import mcore_to_hf
    from megammr.models.checkpoint_io import CheckpointError
    hf, ck = _tiny_and_ckpt(tmp_path)
    _, ck_untied = _tiny_and_ckpt(tmp_path, tied=False)
    cases = [(ck, _config_copy(hf, tmp_path / "fewer", num_hidden_layers=2), "leading axis = decoder layers"),
             (ck, _config_copy(hf, tmp_path / "more", num_hidden_layers=8), "leading axis = decoder layers"),
             (ck, _config_copy(hf, tmp_path / "wider", hidden_size=96), "word_embeddings.weight has shape"),
             (ck_untied, hf, "output_layer.weight")]
    for i, (ckpt, cfg_dir, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(CheckpointError, match="different model") as e:
            mcore_to_hf(ckpt, str(out), cfg_dir)
        assert needle in str(e.value)
        assert not out.exists() and not os.path.exists(str(out) + ".tmp")
    # an existing output is refused before any work, and a missing checkpoint is named as such
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        mcore_to_hf(ck, str(tmp_path / "taken"))
    assert not os.path.exists(str(tmp_path / "taken") + ".tmp")
    with pytest.raises(CheckpointError, match="no such directory"):
        mcore_to_hf(str(tmp_path / "nope"), str(tmp_path / "o"))


def test_hf_to_mcore_rejects_unused_tensors_and_truncated_files(tmp_path):
    import pytest
    from safetensors.torch import load_file, save_file

    from megammr.models.convert import hf_to_mcore
    from megammr.models.checkpoint_io import CheckpointError
    hf, _ = _tiny_and_ckpt(tmp_path)
    # HF weights with 4 layers under a 2-layer config: layers 2-3 were silently dropped
    fewer = _config_copy(hf, tmp_path / "fewer", num_hidden_layers=2)
    os.link(os.path.join(hf, "model.safetensors"), os.path.join(fewer, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no place for.*model.layers.2"):
        hf_to_mcore(fewer, str(tmp_path / "o1"))
    # a tied config may carry lm_head.weight only if it is the embedding
    tied = _config_copy(hf, tmp_path / "tied_lm_head")
    w = load_file(os.path.join(hf, "model.safetensors"))
    w["lm_head.weight"] = w["model.embed_tokens.weight"] + 1
    save_file(w, os.path.join(tied, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        hf_to_mcore(tied, str(tmp_path / "o2"))
    w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    save_file(w, os.path.join(tied, "model.safetensors"), metadata={"format": "pt"})
    hf_to_mcore(tied, str(tmp_path / "o2"))
    # a truncated safetensors file: the error names the file (was a bare SafetensorError)
    trunc = _config_copy(hf, tmp_path / "trunc")
    data = open(os.path.join(hf, "model.safetensors"), "rb").read()
    open(os.path.join(trunc, "model.safetensors"), "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc/model.safetensors: cannot read"):
        hf_to_mcore(trunc, str(tmp_path / "o3"))


def test_convert_cli_clear_errors_for_paths(tmp_path):
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    (tmp_path / "afile").write_text("x")

    def run(*args):
        return subprocess.run([sys.executable, tool, *args], cwd=tmp_path, capture_output=True, text=True)

    for args, needle in ((("hf-to-mcore", "--hf", "nope", "--out", "o"), "nope: no such directory"),
                         (("hf-to-mcore", "--hf", "afile", "--out", "o"), "afile: not a directory"),
                         (("hf-to-mcore", "--hf", "nope", "--out", "afile"), "exists and is not a directory"),
                         (("mcore-to-hf", "--ckpt", "nope", "--out", "o"), "nope: no such directory")):
        p = run(*args)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_check_rejects_bad_layouts_and_mismatched_checkpoints_before_launching(tmp_path):
    """tp/pp that do not divide the model, or a checkpoint of another backbone, failed inside the
    torchrun workers (a bare AssertionError for --tp 0, otherwise buried in torchrun's output)."""
    hf, ck = _tiny_and_ckpt(tmp_path)
    hf_untied, _ = _tiny_and_ckpt(tmp_path, tied=False)
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    for args, needle in ((("--tp", "3"), "tensor-parallel size 3 must divide num_heads=4"),
                         (("--tp", "0"), "must be >= 1"),
                         (("--pp", "3"), "pipeline-parallel size 3 must divide num_layers=4"),
                         (("--hf", hf_untied), "output_layer.weight missing from the checkpoint")):
        argv = ["check", "--hf", hf, "--ckpt", ck, *args]
        p = subprocess.run([sys.executable, tool, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and needle in p.stderr, (args, p.stderr[-2000:])
        assert "torchrun" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_missing_tokenizer_is_named(tmp_path):
    """An HF dir without tokenizer/processor files: check failed inside torchrun with transformers'
    OSError; mcore-to-hf wrote a directory whose processor cannot load without a word."""
    import shutil

    from megammr.models.convert import hf_to_mcore
    hf, _ = _tiny_and_ckpt(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(hf, f), bare / f)
    hf_to_mcore(str(bare), str(tmp_path / "ck_bare"))
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")

    def run(*args):
        return subprocess.run([sys.executable, tool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    p = run("check", "--hf", "bare", "--ckpt", "ck_bare")
    assert p.returncode == 2 and "lacks preprocessor_config.json, tokenizer.json" in p.stderr, p.stderr[-2000:]
    p = run("mcore-to-hf", "--ckpt", "ck_bare", "--out", "back")
    assert p.returncode == 0 and "warning: back has no preprocessor_config.json" in p.stderr, p.stderr[-2000:]
    p = run("mcore-to-hf", "--ckpt", "ck_bare", "--out", "back2", "--hf-config", hf)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr[-2000:]


def test_make_tiny_model_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_tiny_model.py"), "--out", "f"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--out f exists and is not a directory" in p.stderr and "Traceback" not in p.stderr
