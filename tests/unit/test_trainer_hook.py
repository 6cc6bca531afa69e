"""The trainer's step-end hook: `train(recipe, on_step=[...])` calls each callable once per step, in
order, after the step's row is logged, with exactly the row that metrics.jsonl holds (what
`megammr bench step` and library users build on instead of reading the file)."""
import json
import os

from conftest import run_python

RECIPE = os.path.join("recipes", "tiny", "phase1.yaml")
SMALL = ["train.steps=2", "rollout.n=2", "train.prompts_per_step=2", "rollout.max_new_tokens=8",
         "data.num_workers=0", "reward.workers=1", "train.checkpoint_interval=2", "train.export_hf=false",
         "train.progress=lines"]
WORKER = """
import json, os, sys
from megammr.config import load_recipe
from megammr.trainer import train
r = load_recipe(sys.argv[1], sys.argv[2:])
seen = []

def lines_so_far(m):
    with open(os.path.join(r.train.output_dir, "metrics.jsonl")) as f:
        seen.append(sum(1 for line in f if line.strip()))

last = train(r, summary=False, on_step=[seen.append, lines_so_far, lambda m: seen.append(m["step"])])
print("RESULT " + json.dumps({"seen": seen, "last": last}))
"""


def test_on_step_gets_every_logged_row_in_order(tmp_path):
    from megammr.data.synthetic import write_all
    from megammr.models.tiny import write_tiny_model

    shards = write_all(str(tmp_path / "data"), n=8, seed=3, phases=(1,), progress=False)[1]["shards"]
    model = write_tiny_model(str(tmp_path / "model"), seed=3)
    out = tmp_path / "run"
    res = run_python(WORKER, RECIPE, f"model.hf_path={model}", f"data.datasets=[{{path: {shards}}}]", *SMALL,
                     f"train.output_dir={out}", timeout=600)
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    # Each hook sees the row as written (same keys, order and numbers), once that line is in the file.
    assert res["seen"] == [rows[0], 1, 1, rows[1], 2, 2]
    assert list(res["seen"][0]) == list(rows[0])
    assert res["last"] == rows[1]
