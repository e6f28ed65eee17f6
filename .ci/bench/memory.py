#!/usr/bin/env python
"""Where the web process's memory goes: PSS at rest and after each load, for a few variants.

    .ci/.venv/bin/python .ci/bench/memory.py [--seconds 10] [--rounds 2]

One build of a new project (prod settings, real Postgres and Redis on loopback, WEB_CONCURRENCY=2);
each variant starts the Procfile's `web` line in turn, in every round. Printed for each: PSS of the
tree (shared pages counted once, as a dyno's memory is) and each process's USS (its own pages),
idle after the start, after the hello page at 32 connections, after the 50 ms database page at 256.
Variants: as built; glibc's malloc for every object (PYTHONMALLOC=malloc); gunicorn's
--worker-connections 100; a worker collecting reference cycles more often (gc.set_threshold(500,
5, 1), through a hook added to the rendered copy only).
"""

import argparse
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))

import psutil  # noqa: E402
import stack  # noqa: E402
from stack import services  # noqa: E402

from parity import Server  # noqa: E402  (this folder's parity.py)

VARIANTS = {
    "as built": {},
    "PYTHONMALLOC=malloc": {"PYTHONMALLOC": "malloc"},
    "--worker-connections 100": {"GUNICORN_CMD_ARGS": "--worker-connections 100"},
    "gc.set_threshold(500, 5, 1)": {"BENCH_GC_THRESHOLD": "500,5,1"},
}
GC_HOOK = '''

def post_worker_init(worker):  # added by .ci/bench/memory.py to the rendered copy only
    import gc
    if os.environ.get("BENCH_GC_THRESHOLD"):
        gc.set_threshold(*map(int, os.environ["BENCH_GC_THRESHOLD"].split(",")))
'''


def memory(server):
    """(PSS of the tree in MB, [USS of each process in MB])."""
    uss = []
    for process in server.tree():
        with contextlib.suppress(psutil.Error):
            uss.append(process.memory_full_info().uss / 2**20)
    return stack.pss_mb(server.tree()), uss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    pg, redis = services.Postgres().start(), services.redis().start()
    results = {}  # (variant, moment) -> [(pss, uss)]
    try:
        build = stack.Build(tmp)
        config = stack.config_vars(pg, redis, WEB_CONCURRENCY="2")
        stack.release(build, config)
        with open(build.path / "gunicorn.conf.py", "a") as conf:
            conf.write(GC_HOOK)
        for _ in range(args.rounds):
            for name, extra in VARIANTS.items():
                port = services.free_port()
                web = Server(name, ["bash", "-c", build.processes["web"]], build.path,
                             build.env({**config, **extra, "PORT": str(port)}), port)
                try:
                    web.start()
                    time.sleep(2)
                    results.setdefault((name, "idle"), []).append(memory(web))
                    stack.wrk(web.url("/"), 32, args.seconds)
                    results.setdefault((name, "hello"), []).append(memory(web))
                    stack.wrk(web.url("/parity/sleep/?s=0.05"), 256, args.seconds)
                    results.setdefault((name, "db"), []).append(memory(web))
                finally:
                    web.stop()
    finally:
        pg.close()
        redis.close()

    print(f"memory: WEB_CONCURRENCY=2, {args.rounds} rounds, wrk {args.seconds} s per load; "
          "PSS of the tree in MB (median), then each process's USS (master first) in the last round")
    moments = {"idle": "idle", "hello": "after hello@32", "db": "after db-wait@256"}
    for name in VARIANTS:
        cells = []
        for key, label in moments.items():
            runs = results[(name, key)]
            pss = statistics.median(p for p, _ in runs)
            uss = " / ".join(f"{u:.0f}" for u in runs[-1][1])
            cells.append(f"{label} {pss:.1f} ({uss})")
        print(f"{name:>28}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
