"""Slurm signals every process of a job step (srun's forwarding, scancel, the time limit), not only
the trainer. The trainer's helpers must survive the stop signals so that the checkpoint the signal
asks for can be written: forked children (loader workers, megatron's checkpoint writers), megatron's
spawned result-queue process and the verifier workers. Checked by signalling a whole process group."""
import os
import signal
import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, os, signal, sys, time
    from megammr import runtime
    from megammr.train import checkpoint
    from megammr.config import RewardConfig
    from megammr.rewards.core import RewardItem
    from megammr.rewards.pool import RewardPool

    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append("USR1"))
    signal.signal(signal.SIGTERM, lambda *a: got.append("TERM"))
    runtime.forked_children_die_with_parent()
    checkpoint.start_writer()

    def child(q):
        time.sleep(3)
        q.put("child alive")

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    results = filesystem_async._get_write_results_queue()
    with RewardPool(RewardConfig(workers=1)) as pool:
        print("READY", flush=True)
        while len(got) < 2:
            time.sleep(0.05)
        time.sleep(0.5)  # let the signals land everywhere
        results.put("manager alive")
        print(results.get(timeout=10), flush=True)
        print(q.get(timeout=10), flush=True)
        p.join(5)
        print("child exit", p.exitcode, flush=True)
        r = pool.score([RewardItem(response="<think>x</think><answer>\\\\boxed{4}</answer>", answer="4")])
        print("reward", r[0].accuracy, "restarts", pool.stats.restarts, flush=True)
    print("main got", got, flush=True)
""")


def test_helpers_survive_the_stop_signals_sent_to_the_whole_process_group():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)  # its own process group, as a Slurm step
    try:
        line = p.stdout.readline()
        assert line.strip() == "READY", line + p.stderr.read()
        os.killpg(p.pid, signal.SIGUSR1)
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out + err[-3000:]
    assert "manager alive" in out and "child alive" in out and "child exit 0" in out, out + err[-3000:]
    assert "reward 1.0 restarts 0" in out, out + err[-3000:]
    assert "main got ['USR1', 'TERM']" in out, out
