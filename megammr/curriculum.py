"""The Infi-MMR curriculum: phases run in order, each starting from the previous phase's final weights.

A curriculum file (recipes/<backbone>/curriculum.yaml) lists phase recipes (paths relative to it)
and the run directory:

    curriculum:
      output_dir: outputs/tiny
      phases: [phase1.yaml, phase2.yaml, phase3.yaml]

`megammr train CURRICULUM [key=value ...]` runs every phase with the overrides, in
OUTPUT_DIR/<phase.name>; phase k starts from phase k-1's final checkpoint (model weights only:
fresh optimizer, data loader and schedule). A finished phase (OUTPUT_DIR/<name>/DONE) is skipped on
rerun; an interrupted one resumes from its own latest checkpoint. All phases share one process
group (no re-rendezvous between phases).

`--phase K` runs one phase only (slurm/phaseK.sbatch: one job per phase, chained by
slurm/submit_curriculum.sh); it refuses to start unless phase K-1 is DONE, because its starting
weights would otherwise be an unfinished phase's latest checkpoint. `--plan` prints each phase's
directory and state without running anything.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import yaml

from megammr.config import Recipe, RecipeError, load_recipe
from megammr.plot import print_summary, read_rows

# lazy in this module: megammr.runtime and megammr.trainer (torch, megatron-core), in run() only.
# `megammr config show` reads curricula through this module and imports neither.


@dataclass
class Phase:
    name: str
    recipe: Recipe
    output_dir: str


def is_curriculum(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "curriculum" in data


def load(path: str, overrides: list[str] = (), world_size: Optional[int] = None) -> list[Phase]:
    """Every phase's resolved recipe; RecipeError listing the problems of all phases at once."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    spec = data.get("curriculum")
    extra = set(data) - {"curriculum"}
    if not isinstance(spec, dict) or extra:
        raise RecipeError(f"{path}: a curriculum file holds one mapping 'curriculum' "
                          f"(output_dir, phases){'; unknown keys: ' + ', '.join(sorted(extra)) if extra else ''}")
    unknown = set(spec) - {"output_dir", "phases"}
    if unknown:
        raise RecipeError(f"{path}: curriculum.{sorted(unknown)[0]}: unknown key; valid keys: output_dir, phases")
    files = spec.get("phases")
    if not isinstance(files, list) or not files or not all(isinstance(p, str) for p in files):
        raise RecipeError(f"{path}: curriculum.phases must be a non-empty list of recipe paths")
    root = spec.get("output_dir") or "outputs/curriculum"
    for o in overrides:
        if o.startswith("train.output_dir="):
            root = o.split("=", 1)[1]  # the curriculum's run directory; phases live below it
    overrides = [o for o in overrides if not o.startswith("train.output_dir=")]
    phases, prev, errors = [], None, []
    for i, rel in enumerate(files):
        fpath = os.path.join(os.path.dirname(os.path.abspath(path)), rel)
        if not os.path.isfile(fpath):
            errors.append(f"{path}: curriculum.phases[{i}]: {rel}: not found (looked for {os.path.relpath(fpath)}; "
                          "phase paths are relative to the curriculum file)")
            continue
        try:
            name = load_recipe(fpath, overrides).phase.name
            out = os.path.join(root, name)
            init = [f"phase.init_from={prev}"] if prev else []
            recipe = load_recipe(fpath, overrides + [f"train.output_dir={out}"] + init, world_size=world_size)
        except RecipeError as e:  # phases share a base and the overrides: each problem said once
            errors += [line for line in e.errors if line not in errors]
            continue
        phases.append(Phase(name, recipe, out))
        prev = out  # resolved to that phase's final checkpoint when the next phase starts
    if errors:
        raise RecipeError(errors)
    if phases and phases[0].recipe.data.curate is not None and phases[0].recipe.data.curate.model == "previous":
        raise RecipeError(f"{path}: {phases[0].name}: data.curate.model=previous, but it is the first phase "
                          "(no previous export): name an HF directory")
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise RecipeError(f"{path}: two phases share a phase.name ({names}): they would share a directory")
    return phases


def done_marker(output_dir: str) -> str:
    return os.path.join(output_dir, "DONE")


def state(ph: Phase) -> str:
    """done (DONE marker), started (has a checkpoint: resumes), or todo."""
    if os.path.exists(done_marker(ph.output_dir)):
        return "done"
    if os.path.isfile(os.path.join(ph.output_dir, "checkpoints", "latest")):
        return "started"
    return "todo"


def select(path: str, phases: list[Phase], which: str | None) -> list[int]:
    """Indices of the phases to run: all, or the one `which` names (1-based index or phase name),
    whose predecessor must be done."""
    if which is None:
        return list(range(len(phases)))
    names = [p.name for p in phases]
    if which.isdigit() and 1 <= int(which) <= len(phases):
        k = int(which) - 1
    elif which in names:
        k = names.index(which)
    else:
        raise RecipeError(f"{path}: --phase {which}: no such phase; phases: "
                          + ", ".join(f"{i + 1}={n}" for i, n in enumerate(names)))
    if k > 0 and state(phases[k - 1]) != "done":
        prev = phases[k - 1]
        raise RecipeError(f"{path}: phase {k + 1} ({phases[k].name}) starts from phase {k}'s final checkpoint, "
                          f"but {done_marker(prev.output_dir)} does not exist ({prev.name} is {state(prev)}): "
                          f"run phase {k} first (e.g. slurm/phase{k}.sbatch or --phase {k})")
    return [k]


def plan(path: str, overrides: list[str] = (), which: str | None = None) -> str:
    """One line per phase: index, name, state, output directory (tab-separated; for scripts)."""
    phases = load(path, overrides)
    chosen = set(select(path, phases, which))
    return "\n".join(f"{i + 1}\t{ph.name}\t{state(ph)}\t{ph.output_dir}" for i, ph in enumerate(phases)
                     if i in chosen)


def run(path: str, overrides: list[str] = (), which: str | None = None) -> list[dict]:
    """Run (or continue) every phase, or the one `which` names; returns each phase's last metrics (rank 0)."""
    from megammr import runtime
    from megammr.trainer import say, train

    phases = load(path, overrides)
    chosen = select(path, phases, which)
    results = []
    try:
        for i, ph in enumerate(phases):
            if i not in chosen:
                continue
            if os.path.exists(done_marker(ph.output_dir)):
                say(f"phase {i + 1}/{len(phases)} {ph.name}: done already ({done_marker(ph.output_dir)}), skipped")
                with open(done_marker(ph.output_dir)) as f:
                    results.append(json.load(f).get("metrics", {}))
                continue
            say(f"phase {i + 1}/{len(phases)} {ph.name}: {ph.recipe.data.prompt_style} prompts, "
                f"{ph.recipe.train.steps} steps -> {ph.output_dir}")
            if ph.recipe.data.curate is not None:
                curate_data(ph, phases[i - 1].output_dir if i else None)
            last = train(ph.recipe, shutdown=False, summary=False)
            results.append(last)
            runtime.barrier()
            if runtime.is_rank0():
                with open(done_marker(ph.output_dir) + ".tmp", "w") as f:
                    json.dump({"phase": ph.name, "metrics": last}, f)
                os.replace(done_marker(ph.output_dir) + ".tmp", done_marker(ph.output_dir))
            runtime.barrier()
        if runtime.is_rank0():
            summarize(phases)
    finally:
        runtime.shutdown()
    return results


def curate_data(ph: Phase, prev_output_dir: Optional[str]) -> None:
    """data.curate: the phase trains on its data curated by pass rate (megammr.curate), cached in
    OUTPUT_DIR/<phase>/curated/<hash of data, model weights, settings>/ so a rerun or resume reuses it.
    Rank 0 curates; the other ranks wait for it (a file marker: curation may outlast a collective's timeout)."""
    from megammr.curate import curate_phase
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    paths = curate_phase(ph.recipe, prev_output_dir, os.path.join(ph.output_dir, "curated"), rank=rank,
                         world_size=world)
    for ds, path in zip(ph.recipe.data.datasets, paths):
        ds.path = path


def summarize(phases: list[Phase]) -> None:
    """The summary table of every phase (in curriculum order) on stdout and in RUN_DIR/summary.md."""
    rows = [(ph.name, read_rows(os.path.join(ph.output_dir, "metrics.jsonl"))) for ph in phases
            if os.path.exists(os.path.join(ph.output_dir, "metrics.jsonl"))]
    if rows:
        print_summary(os.path.dirname(os.path.normpath(phases[0].output_dir)) or ".", rows)
