"""Entry point of one verifier process: `python -m megammr.rewards._worker '<json config>'`.

Started by RewardPool only. stdin/stdout carry pickled messages, so stdout is re-pointed at
stderr before anything else can print.
"""
import json
import os
import sys
from multiprocessing.connection import Connection

from megammr.rewards.core import Weights
from megammr.rewards.pool import worker_main

if __name__ == "__main__":
    conf = json.loads(sys.argv[1])
    conn_in, conn_out = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker_main(conn_in, conn_out, Weights(**conf["weights"]), int(conf["memory_mb"]))
