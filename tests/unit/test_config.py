"""Typed recipes: extends, strict keys with suggestions, typed values and overrides."""
import glob
import os
import subprocess
import sys
import textwrap

import pytest

from megammr.config import Recipe, RecipeError, field_docs, load_recipe, to_yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_without_file():
    r = load_recipe()
    assert r == Recipe()
    assert r.rollout.n == 16 and r.algo.kl_coef == 1e-3


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True)))
def test_every_shipped_recipe_loads(path):
    from megammr import curriculum
    if curriculum.is_curriculum(path):  # recipes/<backbone>/curriculum.yaml: every phase recipe loads
        phases = curriculum.load(path)
        assert [p.name for p in phases] == ["phase1", "phase2", "phase3"]
        assert phases[1].recipe.phase.init_from == phases[0].output_dir
    else:
        load_recipe(path)


def test_extends_merges_sections_and_replaces_lists(tmp_path):
    write(tmp_path, "base/common.yaml", """
        train: {steps: 10, seed: 7}
        data: {datasets: [{path: a}, {path: b, weight: 2}]}
    """)
    child = write(tmp_path, "phase.yaml", """
        extends: base/common.yaml
        train: {steps: 3}
        data: {datasets: [{path: c}]}
    """)
    r = load_recipe(child)
    assert r.train.steps == 3 and r.train.seed == 7           # merged key by key
    assert [d.path for d in r.data.datasets] == ["c"]         # lists replaced


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    base = write(tmp_path, "base.yaml", "train: {steps: 1}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nrollout: {temprature: 0.7}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(child)
    msg = str(e.value)
    assert "child.yaml" in msg and "rollout.temprature" in msg and "rollout.temperature" in msg
    assert base  # the base file is fine


def test_unknown_section(tmp_path):
    p = write(tmp_path, "r.yaml", "optimiser: {lr: 1.0}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: optimiser: unknown key; did you mean 'optim'"):
        load_recipe(p)


@pytest.mark.parametrize("text,expect", [
    ("train: {steps: three}", "train.steps: expected int"),
    ("train: {steps: 1.5}", "train.steps: expected int"),
    ("train: {steps: true}", "train.steps: expected int"),
    ("optim: {lr: fast}", "optim.lr: expected float"),
    ("rollout: {enforce_eager: 1}", "rollout.enforce_eager: expected bool"),
    ("model: {layer_spec: transformer_engine}", "model.layer_spec: expected one of 'local', 'te'"),
    ("model: {precision: bf61}", "did you mean 'bf16'"),
    ("data: {datasets: {path: a}}", "data.datasets: expected list of mapping"),
    ("data: {datasets: [{path: a, wieght: 2}]}", "did you mean 'data.datasets.weight'"),
    ("train: 5", "train: expected mapping"),
    ("phase: {init_from: 3}", "phase.init_from: expected str or null"),
])
def test_wrong_types_name_expected_type(tmp_path, text, expect):
    p = write(tmp_path, "r.yaml", text + "\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert expect in str(e.value) and "r.yaml" in str(e.value)


def test_yaml11_exponent_floats_and_ints_for_floats(tmp_path):
    p = write(tmp_path, "r.yaml", "optim: {lr: 1e-6, clip_grad: 2}\n")
    r = load_recipe(p)
    assert r.optim.lr == 1e-6 and isinstance(r.optim.clip_grad, float)


def test_overrides_are_typed():
    r = load_recipe(None, ["train.steps=3", "optim.lr=2e-7", "rollout.enforce_eager=false",
                           "phase.name=123", "phase.init_from=null", "model.recompute=full",
                           "data.datasets=[{path: x, weight: 3}]"])
    assert r.train.steps == 3 and r.optim.lr == 2e-7 and r.rollout.enforce_eager is False
    assert r.phase.name == "123" and r.phase.init_from is None and r.model.recompute == "full"
    assert r.data.datasets[0].path == "x" and r.data.datasets[0].weight == 3.0


@pytest.mark.parametrize("ov,expect", [
    ("train.stesp=3", "command line: train.stesp: unknown key; did you mean 'train.steps'"),
    ("trian.steps=3", "did you mean 'train'"),
    ("train.steps=x", "command line: train.steps: expected int"),
    ("train=3", "command line: train: expected mapping"),
    ("train.steps.x=3", "not a section"),
    ("steps", "expected key.sub=value"),
])
def test_bad_overrides(ov, expect):
    with pytest.raises(RecipeError, match=None) as e:
        load_recipe(None, [ov])
    assert expect in str(e.value)


def test_cross_field_validation():
    with pytest.raises(RecipeError, match="fp8 needs model.layer_spec=te"):
        load_recipe(None, ["model.precision=fp8"])
    with pytest.raises(RecipeError, match="sequence_parallel needs"):
        load_recipe(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(RecipeError, match="not divisible"):
        load_recipe(None, ["parallel.tp=2", "parallel.pp=2"]).data_parallel_size(6)
    assert load_recipe(None, ["parallel.tp=2"]).data_parallel_size(8) == 4


def test_circular_extends_and_missing_files(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="circular extends"):
        load_recipe(str(tmp_path / "a.yaml"))
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    p = write(tmp_path, "bad.yaml", "train: [unclosed\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(p)


def test_yaml_round_trip():
    r = load_recipe(os.path.join(REPO, "recipes/tiny/phase2.yaml"), ["train.steps=3"])
    import yaml
    again = load_recipe(None, [f"{k}={v}" for k, v in _flatten(yaml.safe_load(to_yaml(r)))])
    assert again == r


def _flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            import yaml
            yield key, (yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
                        if not isinstance(v, str) else v)


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) > 40
    assert all(help_ for _, _, _, help_ in rows), [k for k, _, _, h in rows if not h]


def test_cli_config_show_and_error():
    run = lambda *a: subprocess.run([sys.executable, "-m", "megammr.cli", *a], capture_output=True, text=True, cwd=REPO)
    p = run("config", "show", "recipes/tiny/phase1.yaml", "train.steps=3")
    assert p.returncode == 0, p.stderr
    assert "steps: 3" in p.stdout and "prompt_style: text" in p.stdout
    p = run("config", "show", "recipes/tiny/phase1.yaml", "train.setps=3")
    assert p.returncode != 0 and "did you mean 'train.steps'" in p.stderr
    p = run("--help")
    assert p.returncode == 0 and "config" in p.stdout
    p = run("version")
    assert p.returncode == 0 and "megatron-core" in p.stdout
    p = run("nonsense")
    assert p.returncode == 2
