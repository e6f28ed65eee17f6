#!/usr/bin/env python
"""Soak: the Procfile's web line under steady load for minutes; figures, no assertions.

    .ci/.venv/bin/python .ci/bench/soak.py [--minutes 10] [--connections 32]

One wrk run on the hello page for the whole soak, against a fresh project with prod settings, real
Postgres and Redis on loopback, WEB_CONCURRENCY=2. Every 10 s: the PSS of the web tree (shared
pages counted once, as a dyno's memory is) and the worker pids. Printed: PSS for each minute (its
mean), first against last minute, workers replaced (recycling), and req/s, p50, p99 and p99/p50
over all requests of the load (wrk's own distribution, not a median of rounds).
"""

import argparse
import contextlib
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))

import psutil  # noqa: E402
import stack  # noqa: E402
from stack import services  # noqa: E402

from parity import Server  # noqa: E402  (this folder's parity.py)

WORKERS = 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))
    seconds = int(args.minutes * 60)
    load_before = " ".join(f"{x:.1f}" for x in psutil.getloadavg())

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    pg, redis = services.Postgres().start(), services.redis().start()
    web, busy = None, []
    try:
        build = stack.Build(tmp)
        config = stack.config_vars(pg, redis, WEB_CONCURRENCY=str(WORKERS))
        stack.release(build, config)
        port = services.free_port()
        # The Procfile's web line, as parity.py starts it (bash execs gunicorn: its master).
        web = Server("web", ["bash", "-c", build.processes["web"]], build.path,
                     build.env({**config, "PORT": str(port)}), port)
        web.start()
        url = web.url()
        master = psutil.Process(web.proc.pid)
        # The first 200 can come before the second worker runs: wrk's keep-alive connections
        # would then all stay with the first one for the whole soak.
        while len(master.children()) < WORKERS:
            time.sleep(0.1)
        time.sleep(2)
        workers = master.children()
        cpu_before = [sum(w.cpu_times()[:2]) for w in workers]

        samples, stop = [], threading.Event()  # (seconds since start, PSS MB, worker pids)

        def sample():
            started = time.monotonic()
            while not stop.wait(10):
                tree = [master, *master.children(recursive=True)]
                pids = frozenset(p.pid for p in master.children())
                samples.append((time.monotonic() - started, stack.pss_mb(tree), pids))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = stack.wrk(url, args.connections, seconds)
        stop.set()
        sampler.join()
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker replaced: no share to show
            busy = [sum(w.cpu_times()[:2]) - b for w, b in zip(workers, cpu_before, strict=True)]
    finally:
        if web:
            web.stop()
        pg.close()
        redis.close()

    print(f"soak: {args.minutes:g} min of wrk at {args.connections} connections on the hello page,"
          f" WEB_CONCURRENCY={WORKERS}; load average before: {load_before}")
    minutes = {}
    for at, pss, _ in samples:
        minutes.setdefault(int(at // 60), []).append(pss)
    print("PSS by minute (MB): " + ", ".join(f"{m + 1}: {statistics.mean(v):.0f}"
                                              for m, v in sorted(minutes.items())))
    first, last = statistics.mean(minutes[min(minutes)]), statistics.mean(minutes[max(minutes)])
    print(f"PSS first minute {first:.0f} MB, last minute {last:.0f} MB, ratio {last / first:.2f}")
    pids = [p for _, _, p in samples]
    replaced = len(set().union(*pids) - pids[0]) if pids else 0
    print(f"workers replaced during the soak: {replaced}")
    if busy:  # about equal when both workers served the load
        print("CPU seconds of each worker: " + ", ".join(f"{b:.0f}" for b in busy))
    p50, p99 = result["p50_ms"], result["p99_ms"]
    print(f"{result['requests']} requests, {result['rps']:.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms,"
          f" p99/p50 {p99 / p50:.1f}, errors {result['non_2xx'] + result['socket_errors']}")


if __name__ == "__main__":
    main()
