"""A test-only rollout engine for curation tests, and a `megammr` launcher that registers it.

FakeEngine answers from the prompt text, deterministically: a question "Easy ... The answer is A."
is always answered A, "Hard ..." never correctly, "Medium ... The answer is A." correctly in k of
the n samples, k in 1..n-1 drawn from (sampling seed, prompt text) and the correct samples placed
by the same seed. So easy prompts have pass rate 1, hard 0, medium strictly between, and the
medium ones change with the seed. Registered first in the registry (monkeypatch, or `python
curate_fakes.py ARGS...` for a subprocess), `rollout.engine=auto` picks it: the code path is the
one users run, the model is not.

FAKE_ENGINE_DELAY_S (environment) sleeps that long in each generate call (for kill tests).
"""
import hashlib
import os
import re
import sys
import time

from megammr.rollout.base import Rollout, RolloutEngine


def _h(*parts) -> int:
    return int(hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12], 16)


class FakeEngine(RolloutEngine):
    label = "fake"
    builds = 0

    @classmethod
    def build(cls, recipe, rt, *, group, leader, is_leader):
        FakeEngine.builds += 1
        return cls()

    def update_weights(self, named):
        return 0

    def generate(self, prompts, n, sampling):
        delay = float(os.environ.get("FAKE_ENGINE_DELAY_S", "0"))
        if delay:
            time.sleep(delay)
        out = []
        for i, p in enumerate(prompts):
            m = re.search(r"The answer is (\w+)\.", p.text)
            gold = m.group(1) if m else None
            if "Easy" in p.text:
                right = set(range(n))
            elif "Medium" in p.text:
                k = 1 + _h(sampling.seed, p.text) % (n - 1)
                right = set(sorted(range(n), key=lambda j: _h(sampling.seed, p.text, j))[:k])
            else:
                right = set()
            for j in range(n):
                ans = gold if j in right else "nothing"
                out.append(Rollout(i, j, f"<think>t</think><answer>{ans}</answer>", [1, 2], [-1.0, -1.0], "stop"))
        return out


def register(registry):
    registry.ENGINES = {"fake": FakeEngine, **{k: v for k, v in registry.ENGINES.items() if k != "fake"}}


if __name__ == "__main__":
    from megammr.cli import main
    from megammr.rollout import registry
    register(registry)
    sys.exit(main(sys.argv[1:]))
