"""Runtime: launcher environment parsing, and the CPU layer + seeding in a fresh process
(the layer patches torch process-wide, so it never runs inside the pytest process)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from megammr.runtime import _first_slurm_host, dist_env_from

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torchrun_env_wins_over_slurm():
    e = dist_env_from({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                       "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (3, 4, 1, "h", 1234, "torchrun")


def test_slurm_env():
    e = dist_env_from({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                       "SLURM_NNODES": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (5, 8, 1, "slurm")
    assert e.master_addr == "127.0.0.1" and e.master_port == 20000 + 4242 % 20000


def test_slurm_multinode_master_from_nodelist(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the built-in parser is used
    e = dist_env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "2",
                       "SLURM_JOB_NODELIST": "gpu[07-08]", "MASTER_PORT": "6000"})
    assert e.master_addr == "gpu07" and e.master_port == 6000
    assert _first_slurm_host("a1,b2") == "a1"
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        dist_env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "2"})


def test_single_process_default_and_bad_values():
    e = dist_env_from({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")
    with pytest.raises(RuntimeError, match="not an integer"):
        dist_env_from({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="outside world size"):
        dist_env_from({"RANK": "2", "WORLD_SIZE": "2"})


CHILD = textwrap.dedent("""
    import json, os, socket, torch
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megammr.config import load_recipe
    from megammr import runtime, megatron_cpu
    import torch.distributed as dist
    seen, real_init = {}, dist.init_process_group
    def spy(*a, **k):  # the collective timeout comes from the recipe (parallel.dist_timeout_s)
        seen["timeout_s"] = k["timeout"].total_seconds()
        return real_init(*a, **k)
    dist.init_process_group = spy
    default_threads = torch.get_num_threads()
    rt = runtime.init(load_recipe(None, ["train.seed=77", "parallel.dist_timeout_s=123", "train.cpu_threads=1"]))
    out = {"backend": rt.backend, "device": str(rt.device), "dp": rt.dp, "patches": rt.cpu_patches,
           "again": megatron_cpu.apply(), "timeout_s": seen["timeout_s"],
           "threads": [default_threads, torch.get_num_threads()]}
    # device="cuda" literals and .cuda() land on CPU
    out["zeros_device"] = str(torch.zeros(2, device="cuda").device)
    out["ordinal_device"] = str(torch.empty(1, device=torch.cuda.current_device()).device)
    out["dot_cuda"] = str(torch.ones(1).cuda().device)
    out["to_cuda"] = str(torch.ones(1).to("cuda").device)
    # type() names only: conversions are untouched
    out["type_name"] = torch.ones(1).type()
    out["type_convert"] = str(torch.ones(1).type(torch.float64).dtype)
    # the model-parallel RNG tracker forks the CPU generator without disturbing the default stream
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    out["fork_advances"] = not torch.equal(a, b)
    out["default_untouched"] = torch.equal(before, torch.get_rng_state())
    out["first_rand"] = torch.rand(1).item()
    # suspended(): the mode is off inside (the engine's generate) and back on after, even after an error
    from torch.overrides import _get_current_function_mode as top
    with megatron_cpu.suspended():
        out["suspended_top"] = repr(top())
    try:
        with megatron_cpu.suspended():
            raise KeyError
    except KeyError:
        pass
    out["after_suspend"] = top() is megatron_cpu._MODE and str(torch.zeros(1, device="cuda").device) == "cpu"
    runtime.shutdown()
    print("RESULT " + json.dumps(out))
""")


def _child():
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("OMP_NUM_THREADS", None)  # torch's own default, so that train.cpu_threads is what sets 1
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[7:])


def test_cpu_layer_and_seeding_in_fresh_process():
    out = _child()
    assert out["backend"] == "gloo" and out["device"] == "cpu" and out["dp"] == 1
    assert set(out["patches"]) == {"current_device", "synchronize", "streams", "rng_tracker", "device_mode",
                                   "cuda_type_names"}
    assert out["again"] == out["patches"]  # idempotent
    assert out["timeout_s"] == 123
    assert out["zeros_device"] == out["ordinal_device"] == out["dot_cuda"] == out["to_cuda"] == "cpu"
    assert out["type_name"] == "torch.cuda.FloatTensor" and out["type_convert"] == "torch.float64"
    assert out["fork_advances"] and out["default_untouched"]
    assert out["first_rand"] == _child()["first_rand"]  # seeded: reproducible across processes
    assert out["suspended_top"] == "None" and out["after_suspend"]
    assert out["threads"][1] == 1  # train.cpu_threads=1 applied (torch's default here: out["threads"][0])
