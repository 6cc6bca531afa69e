"""The engine registry: an engine registered here (not in megammr.train.setup) is resolved, checked
and built through it, its rules and settings apply, and the trainer calls its hooks."""
import pytest

from megammr.config import RecipeError, load_recipe
from megammr.rollout import registry
from megammr.rollout import vllm_engine as ve
from megammr.rollout.base import Rollout, RolloutEngine
from megammr.train import setup
from megammr.train.experience import Experience


class DummyEngine(RolloutEngine):
    label = "dummy"
    collective = True
    build_before_model = True
    settings = ("top_k",)  # a field only this engine honours (in this test)
    built, calls = [], []

    @classmethod
    def available(cls, cuda):
        return cuda, "" if cuda else "dummy needs a GPU"

    @classmethod
    def check(cls, recipe, cuda):
        return [] if cuda else ["rollout.engine=dummy needs a GPU"]

    @classmethod
    def build(cls, recipe, rt, *, group, leader, is_leader):
        cls.built.append((leader, is_leader))
        return cls()

    def generate(self, prompts, n, sampling):
        return [Rollout(i, j, "x", [1], [-1.0], "stop") for i in range(len(prompts)) for j in range(n)]

    def follow_rollouts(self):
        self.calls.append("follow")
        return 0

    def finish_rollouts(self):
        self.calls.append("finish")


@pytest.fixture
def dummy(monkeypatch):
    # First in auto's order; the registry is read at call time, so setup needs no change.
    monkeypatch.setattr(registry, "ENGINES", {"dummy": DummyEngine, **registry.ENGINES})
    monkeypatch.setattr(ve, "vllm_version", lambda: "0.20.0")
    DummyEngine.built, DummyEngine.calls = [], []
    return DummyEngine


def _recipe(tmp_path, *overrides, engine=None):
    (tmp_path / "config.json").write_text("{}")
    r = load_recipe("recipes/tiny/phase1.yaml", [f"model.hf_path={tmp_path}", *overrides])
    if engine:
        r.rollout.engine = engine  # past the schema, which lists the shipped engines
    return r


def test_registered_engine_is_checked_through_the_registry(dummy, tmp_path):
    assert setup.check_recipe(_recipe(tmp_path, engine="dummy"), 1, cuda=True) == "dummy"
    with pytest.raises(RecipeError) as e:
        setup.check_recipe(_recipe(tmp_path, "rollout.sleep_level=1", engine="dummy"), 1, cuda=False)
    assert e.value.errors == [
        "rollout.sleep_level is a vLLM setting: the dummy engine cannot honour it (remove it or set rollout.engine=vllm)",
        "rollout.engine=dummy needs a GPU"]
    # its own setting is refused by the others
    with pytest.raises(RecipeError, match="rollout.top_k is a dummy setting: the transformers engine cannot "
                                          r"honour it \(remove it or set rollout.engine=dummy\)"):
        setup.check_recipe(_recipe(tmp_path, "rollout.top_k=5", "rollout.engine=transformers"), 1, cuda=True)


def test_auto_goes_through_the_registry_in_order(dummy, tmp_path, capsys):
    assert registry.resolve_engine("auto", cuda=True) == ("dummy", "")
    assert registry.resolve_engine("auto", cuda=False) == (
        "transformers", "rollout.engine=auto: dummy needs a GPU, using the transformers engine (slow)")
    assert setup.check_recipe(_recipe(tmp_path), 1, cuda=False) == "transformers"
    assert "dummy needs a GPU" in capsys.readouterr().out


def test_registered_engine_is_built_where_its_attributes_say(dummy, tmp_path):
    r = _recipe(tmp_path, engine="dummy")
    place = dict(group=None, src=3, is_src=False)
    assert setup.build_engine(dummy, r, None, before_model=False, **place) is None   # built before the model
    eng = setup.build_engine(dummy, r, None, before_model=True, **place)            # on every rank: collective
    assert isinstance(eng, DummyEngine) and dummy.built == [(3, False)]

    class Local(DummyEngine):
        collective = build_before_model = False
    assert setup.build_engine(Local, r, None, before_model=False, **place) is None  # the source rank only
    assert isinstance(setup.build_engine(Local, r, None, before_model=False, group=None, src=0, is_src=True), Local)


def test_trainer_calls_the_hooks(dummy, tmp_path):
    r = _recipe(tmp_path, engine="dummy")
    follower = Experience(r, engine=DummyEngine(), loader=None, pool=None, dp_rank=0, dp_size=1, mp_group=None,
                          src=0, is_src=False)
    assert follower.collect(1) is None and DummyEngine.calls == ["follow"]
    with pytest.raises(TypeError, match="not a megammr.rollout.base.RolloutEngine"):
        Experience(r, engine=object(), loader=None, pool=None, dp_rank=0, dp_size=1, mp_group=None, src=0,
                   is_src=True)


def test_names():
    assert registry.engine_class("transformers").__name__ == "TransformersEngine"  # "module:Class", imported now
    assert registry.engine_class("vllm") is ve.VLLMEngine
    with pytest.raises(ValueError, match="rollout.engine=sglang: no such engine"):
        registry.engine_class("sglang")
