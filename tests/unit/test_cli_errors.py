"""A new user's first hour: every bad input is one clear line and a non-zero exit (never a
traceback), every problem of a recipe is reported in one run, and the commands say what they
used and what comes next."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from megammr.config import RecipeError, RecipeWarning, RolloutConfig, load_recipe, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(REPO, "tests", "fixtures", "eval")
DATA = {"mathvista": os.path.join(FIX, "mathvista", "testmini.json"),
        "mathverse": os.path.join(FIX, "mathverse", "testmini.json"),
        "mathvision": os.path.join(FIX, "mathvision", "test.jsonl"),
        "olympiadbench": os.path.join(FIX, "olympiadbench")}
SEVEN_B = os.path.join(REPO, "recipes", "qwen2_5_vl_7b", "phase1.yaml")
TINY = os.path.join(REPO, "recipes", "tiny", "phase1.yaml")


def megammr(*args, cwd=REPO):
    """`python -m megammr ARGS` (the module entry point, as a user would run it)."""
    return subprocess.run([sys.executable, "-m", "megammr", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def errors(fn):
    with pytest.raises(RecipeError) as e:
        fn()
    return e.value.errors


# --------------------------------------------------------------------------- the command itself
def test_version_and_python_dash_m():
    import megammr as pkg
    p = megammr("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"megammr {pkg.__version__}"
    p = megammr("--help")
    assert p.returncode == 0 and "usage: megammr" in p.stdout and "--version" in p.stdout


@pytest.mark.parametrize("args", [["config", "fields"], ["config", "show", "recipes/tiny/curriculum.yaml"],
                                  ["--help"]])
def test_a_closed_pipe_ends_quietly(args):
    """`megammr ... | head`: the reader is gone before the first write."""
    p = subprocess.Popen([sys.executable, "-m", "megammr", *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc in (141, 0), (rc, err)  # argparse's --help exits through SystemExit(0) before our handler
    if args != ["--help"]:
        assert rc == 141


# --------------------------------------------------------------------------- recipes
def test_config_show_of_a_directory_names_its_files():
    p = megammr("config", "show", "recipes/tiny")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "megammr: error: recipes/tiny: is a directory, not a recipe file; pass one of its files, e.g. "
        "recipes/tiny/phase1.yaml (there: base.yaml, curriculum.yaml, phase1.yaml, phase2.yaml, phase3.yaml)"]


def test_every_problem_of_a_file_in_one_run(tmp_path):
    bad = write(tmp_path, "bad.yaml", """
        rollout:
          temprature: 0.7
          max_new_tokens: lots
        train: {steps: three}
        algo: {overlong_buffer: 100}
        data: {datasets: [{path: a, wieght: 2}, {path: b, weight: heavy}]}
    """)
    errs = errors(lambda: load_recipe(bad, ["optim.lr=fast", "train.stesp=1", "rollout.n=0"]))
    assert errs == [  # in reading order: the file, then the command line
        f"{bad}: rollout.temprature: unknown key; did you mean 'rollout.temperature'?",
        f"{bad}: rollout.max_new_tokens: expected int, got 'lots' (str)",
        f"{bad}: train.steps: expected int, got 'three' (str)",
        f"{bad}: data.datasets[0].wieght: unknown key; did you mean 'data.datasets.weight'?",
        f"{bad}: data.datasets[1].weight: expected float, got 'heavy' (str)",
        "command line: optim.lr: expected float, got 'fast' (str)",
        "command line: train.stesp: unknown key; did you mean 'train.steps'?",
        # the cross-field rules run too; the overlong rule reads rollout.max_new_tokens, which
        # failed above, so it is skipped instead of judging the default 4096
        "command line: rollout.n must be >= 1",
    ]


def test_config_show_prints_each_error_on_its_line(tmp_path):
    write(tmp_path, "bad.yaml", "rollout:\n  temprature: 0.7\ntrain:\n  steps: three\n")
    p = megammr("config", "show", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [  # what the README shows
        "megammr: error: bad.yaml: rollout.temprature: unknown key; did you mean 'rollout.temperature'?",
        "megammr: error: bad.yaml: train.steps: expected int, got 'three' (str)"]


def test_unknown_backbone_and_parallel_layout_are_load_errors(tmp_path):
    (e,) = errors(lambda: load_recipe(None, ["model.backbone=qwen"]))
    assert e.startswith("command line: model.backbone: 'qwen' is not in the backbones table")
    assert "tiny, qwen2.5-vl-3b, qwen2.5-vl-7b, qwen2.5-vl-32b, qwen2.5-vl-72b" in e
    # 7B: 28 heads, 4 KV heads, 28 layers
    assert errors(lambda: load_recipe(SEVEN_B, ["parallel.tp=3"])) == [
        "command line: parallel.tp=3: qwen2.5-vl-7b: tensor-parallel size 3 must divide num_heads=28 and "
        "num_kv_heads=4 (tp can be 1, 2, 4)"]
    assert errors(lambda: load_recipe(SEVEN_B, ["parallel.pp=3"])) == [
        "command line: parallel.pp=3: qwen2.5-vl-7b: pipeline-parallel size 3 must divide num_layers=28 "
        "(pp can be 1, 2, 4, 7, 14, 28)"]
    # tiny: 4 heads, 2 KV heads, 4 layers; the layouts the distributed tests use load
    load_recipe(TINY, ["parallel.tp=2", "parallel.pp=2"])
    assert "num_kv_heads=2" in errors(lambda: load_recipe(TINY, ["parallel.tp=4"]))[0]
    # model.hf_path/config.json, when present, is what the builder reads: its numbers decide
    from megammr.backbones import BACKBONES
    wide = BACKBONES["tiny"].replace(num_kv_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(wide.to_hf_config()))
    assert load_recipe(TINY, ["parallel.tp=4", f"model.hf_path={tmp_path}"]).parallel.tp == 4
    # one rule, one function: the builder's check is the one recipe loading runs
    from megammr import backbones
    from megammr.config import rules
    from megammr.models import vlm
    assert vlm.check_parallel_layout is backbones.check_parallel_layout is rules.check_parallel_layout


def test_data_parallel_split_with_a_world_size():
    assert load_recipe(TINY, world_size=2).train.prompts_per_step == 8
    (e,) = errors(lambda: load_recipe(TINY, world_size=3))
    assert e.endswith("base.yaml: train.prompts_per_step=8 does not split over 3 data-parallel ranks "
                      "(each rank owns whole prompt groups)")
    (e,) = errors(lambda: load_recipe(SEVEN_B, world_size=3))
    assert "world size 3 is not divisible by parallel.tp x pp x cp = 2" in e
    p = megammr("config", "show", "recipes/tiny/curriculum.yaml", "--world-size", "3")
    assert p.returncode == 2 and p.stderr.count("does not split over 3") == 1  # once, not once per phase


def test_a_short_last_micro_batch_is_a_warning(recwarn):
    with pytest.warns(RecipeWarning, match=r"micro_batch_size=5 does not divide the 64 samples of an update.*"
                                           r"last micro-batch holds 4"):
        load_recipe(TINY, ["train.micro_batch_size=5"])
    recwarn.clear()
    load_recipe(TINY)
    load_recipe(TINY, ["train.micro_batch_size=5", "train.max_tokens_per_micro_batch=512"])  # a token budget
    assert not [w for w in recwarn if issubclass(w.category, RecipeWarning)]
    p = megammr("config", "show", "recipes/tiny/phase1.yaml", "train.micro_batch_size=5")
    assert p.returncode == 0 and p.stderr.count("megammr: warning: train.micro_batch_size=5") == 1


def test_missing_extends_target_names_the_extending_recipe(tmp_path):
    write(tmp_path, "child.yaml", "extends: mid.yaml\n")
    write(tmp_path, "mid.yaml", "extends: ../gone/base.yaml\ntrain: {steps: 2}\n")
    (e,) = errors(lambda: load_recipe(str(tmp_path / "child.yaml")))
    assert e.startswith(f"{tmp_path / 'mid.yaml'}: extends: ../gone/base.yaml: not found (looked for ")
    assert "relative to the extending file" in e
    p = megammr("config", "show", "child.yaml", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("megammr: error: mid.yaml: extends: ../gone/base.yaml: not found")


def test_curriculum_show_and_a_missing_phase(tmp_path):
    p = megammr("config", "show", "recipes/tiny/curriculum.yaml", "train.steps=2")
    assert p.returncode == 0, p.stderr
    docs = list(yaml.safe_load_all(p.stdout))
    assert [d["phase"]["name"] for d in docs] == ["phase1", "phase2", "phase3"]
    assert [d["phase"]["init_from"] for d in docs] == [None, "outputs/tiny/phase1", "outputs/tiny/phase2"]
    assert all(d["train"]["steps"] == 2 for d in docs)
    cur = write(tmp_path, "curriculum.yaml", "curriculum:\n  phases: [p1.yaml, p2.yaml]\n")
    write(tmp_path, "p1.yaml", "phase: {name: one}\ntrain: {steps: x}\n")
    from megammr import curriculum
    errs = errors(lambda: curriculum.load(cur))
    assert errs[0].endswith("p1.yaml: train.steps: expected int, got 'x' (str)")
    assert errs[1].startswith(f"{cur}: curriculum.phases[1]: p2.yaml: not found")
    # a curriculum file given where a recipe is expected says what it is
    (e,) = errors(lambda: load_recipe(os.path.join(REPO, "recipes", "tiny", "curriculum.yaml")))
    assert "a curriculum file, not a recipe" in e


# --------------------------------------------------------------------------- eval
def test_eval_refuses_bad_model_device_and_bench_before_loading(tmp_path, capsys):
    from megammr.cli import main
    base = ["eval", "--bench", "mathvista", "--data", DATA["mathvista"], "--out", str(tmp_path / "ev")]
    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok").mkdir()
    for f in ("config.json", "model.safetensors"):  # passes the checks; nothing gets loaded
        (tmp_path / "ok" / f).write_text("{}")
    cases = [
        (["--model", str(tmp_path / "cfg-only")], "no weights there (*.safetensors or pytorch_model*.bin)"),
        (["--model", str(tmp_path / "empty")], "no config.json there"),
        (["--model", str(tmp_path / "ok" / "config.json")], "not a directory"),
        (["--model", str(tmp_path / "ok"), "--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
        (["--model", str(tmp_path / "ok"), "--bench", "mathverse"], "a MathVista record (it has 'pid'), not "
                                                                      "MathVerse: pass --bench mathvista"),
    ]
    import torch
    if not torch.cuda.is_available():
        cases.append((["--model", str(tmp_path / "ok"), "--device", "cuda"], "sees no CUDA device (a CPU-only build)"))
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("wrong", ["mathvista", "mathverse", "mathvision", "olympiadbench"])
def test_eval_names_the_benchmark_a_file_belongs_to(wrong):
    from megammr.eval import EvalDataError, load_benchmark
    from megammr.eval.readers import NAMES
    for bench, path in DATA.items():
        if bench == wrong:
            continue
        with pytest.raises(EvalDataError) as e:
            load_benchmark(wrong, path)
        assert f"a {NAMES[bench]} record" in str(e.value) and str(e.value).endswith(f"pass --bench {bench}")


class _Engine:
    """Stands in for the transformers engine: records the sampling limits it was given."""
    seen: list = []

    @classmethod
    def from_pretrained(cls, path, **kw):
        return cls()

    def generate(self, prompts, n, sampling):
        from megammr.rollout import Rollout
        _Engine.seen.append(sampling.max_new_tokens)
        return [Rollout(prompt_index=i, sample_index=0, text="<think>x</think><answer>1</answer>", token_ids=[1],
                        logprobs=[0.0], finish_reason="stop") for i in range(len(prompts))]


def _phase_export(root):
    """OUTPUT_DIR as a phase leaves it: hf/ beside checkpoints/ with the saved recipe."""
    (root / "hf").mkdir(parents=True)
    (root / "hf" / "config.json").write_text("{}")
    (root / "hf" / "model.safetensors").write_bytes(b"")
    ck = root / "checkpoints" / "step_000020"
    ck.mkdir(parents=True)
    (root / "checkpoints" / "latest").write_text("step_000020\n")
    recipe = load_recipe(os.path.join(REPO, "recipes", "tiny", "phase3.yaml"))
    (ck / "megammr.json").write_text(json.dumps({"step": 20, "recipe": to_dict(recipe)}))
    return str(root / "hf")


def test_eval_max_new_tokens_from_the_run_a_flag_or_the_default(tmp_path, capsys, monkeypatch):
    import megammr.rollout
    from megammr.cli import main
    monkeypatch.setattr(megammr.rollout, "TransformersEngine", _Engine)
    model = _phase_export(tmp_path / "run")
    base = ["eval", "--bench", "mathvista", "--data", DATA["mathvista"], "--out", str(tmp_path / "ev"),
            "--device", "cpu", "reward.workers=1"]
    tiny_tokens = load_recipe(os.path.join(REPO, "recipes", "tiny", "phase3.yaml")).rollout.max_new_tokens
    runs = [(["--model", model], tiny_tokens, "rollout.max_new_tokens of "),
            (["--model", model, "--max-new-tokens", "5"], 5, "(--max-new-tokens)"),
            (["--model", model, "--recipe", os.path.join(REPO, "recipes", "qwen2_5_vl_3b", "phase3.yaml")],
             load_recipe(os.path.join(REPO, "recipes", "qwen2_5_vl_3b", "phase3.yaml")).rollout.max_new_tokens,
             "qwen2_5_vl_3b/phase3.yaml")]
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("config.json", "model.safetensors"):
        (plain / f).write_bytes(b"{}")
    runs.append((["--model", str(plain)], RolloutConfig().max_new_tokens,
                 "the defaults in megammr/config/schema.py"))
    for extra, tokens, source in runs:
        _Engine.seen = []
        assert main(base + extra + ["--progress"]) == 0
        cap = capsys.readouterr()
        assert set(_Engine.seen) == {tokens}, (extra, _Engine.seen)
        assert f"max_new_tokens {tokens} (" in cap.err and source in cap.err, cap.err
        assert "eval mathvista: 100%" in cap.err and "3/3" in cap.err  # the progress bar
        assert "&nbsp;" not in cap.out and "mathvista testmini (overall)" in cap.out
    assert "&nbsp;&nbsp;" in (tmp_path / "ev" / "mathvista_summary.md").read_text()  # the Markdown file keeps it


# --------------------------------------------------------------------------- score
def test_score_input_directory_and_nothing_scorable(tmp_path, capsys):
    from megammr.cli import main
    assert main(["score", "--input", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"megammr score: --input {tmp_path} is a directory: "
                                               "a JSONL file (or '-' for stdin) is expected")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"response": "x"}\nnot json\n')
    out = tmp_path / "scored.jsonl"
    out.write_text("previous\n")
    assert main(["score", "--input", str(inp), "--output", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"megammr score: nothing scored: {inp}: all 2 line(s) are malformed (written to " in err
    assert out.read_text() == "previous\n"  # kept: `--output` may be the input itself
    rej = [json.loads(x) for x in (tmp_path / "scored.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in rej] == [(1, '{"response": "x"}'), (2, "not json")]
    inp.write_text("\n\n")
    assert main(["score", "--input", str(inp), "--workers", "1"]) == 2
    assert "it holds no lines" in capsys.readouterr().err
    # a clean run removes the stale rejects of its own output
    inp.write_text('{"response": "<think>a</think><answer>2</answer>", "answer": "2"}\n')
    assert main(["score", "--input", str(inp), "--output", str(out), "--workers", "1"]) == 0
    assert json.loads(out.read_text())["reward"] == 1.5 and not (tmp_path / "scored.rejected.jsonl").exists()


# --------------------------------------------------------------------------- train
def test_train_checks_every_phase_for_this_launch_up_front(monkeypatch, capsys):
    from megammr.cli import main
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["train", "recipes/tiny/curriculum.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["megammr train: error: train.prompts_per_step=8 does not split over 3 "
                                        "data-parallel ranks (each rank owns whole prompt groups)"]


def test_train_ends_with_what_was_done_and_what_next(capsys, monkeypatch):
    from megammr import curriculum, train_cli
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RANK", raising=False)
    phases = curriculum.load("recipes/tiny/curriculum.yaml")
    train_cli._next_steps(phases)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("megammr train: done: phase1 (40 steps), phase2 (20 steps), phase3 (20 steps) in outputs/tiny; "
                      "final weights outputs/tiny/phase3/hf")
    assert out[1].startswith("next: megammr plot outputs/tiny ")
    assert out[2].strip().startswith("megammr eval --model outputs/tiny/phase3/hf --bench mathvista")
    (one,) = curriculum.load("recipes/tiny/curriculum.yaml", ["train.export_hf=false"])[:1]
    train_cli._next_steps([one])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("in outputs/tiny/phase1; final weights outputs/tiny/phase1/checkpoints")
    assert len(out) == 2 and "megammr plot outputs/tiny/phase1" in out[1]
