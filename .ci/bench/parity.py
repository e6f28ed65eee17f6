#!/usr/bin/env python
"""Production-parity benchmark: figures and ratios from ONE interleaved run, no assertions.

    .ci/.venv/bin/python .ci/bench/parity.py [--seconds 5] [--rounds 3] [--before main]

Targets, all on this machine with 2 workers each, against real Postgres and Redis on loopback:
  ceiling  a 5-line WSGI hello app under gunicorn, 2 sync workers (what this machine can do)
  plain    Django's own `startproject`, DEBUG off, one view rendering a template, 2 sync workers
  web      the new project's Procfile `web` line (gunicorn.conf.py) with prod settings
  before   the same, rendered from the template at git revision --before (default main)
Measured, the targets taking turns in every round: the hello page's req/s and p50/p99 at 32 and
128 connections, and the CPU time each server's processes spent per request (which other work on
a shared machine moves far less than req/s); a page waiting 50 ms in the database (pg_sleep) at
256 connections beside the bound the pool sets (WEB_CONCURRENCY x DATABASE_POOL_SIZE / 0.05 s);
Celery no-op tasks done per second by the Procfile's worker with the project's settings, by a
Celery app with Celery's defaults on the same Redis, and by the --before worker. After the rounds:
PSS of each web tree (shared pages counted once, as a dyno's memory is) and time from start to
the first 200 (median of 3, each start alone).
"""

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))

import psutil  # noqa: E402
import stack  # noqa: E402
from stack import services  # noqa: E402

WORKERS = 2
POOL_SIZE = 7  # prod.py's default DATABASE_POOL_SIZE
WSGI_HELLO = '''\
def app(environ, start_response):
    body = b"Hello, world"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''
# A Celery app with nothing but its broker: Celery's defaults (early acks, prefetch 4, no results).
CELERY_DEFAULTS = '''\
import os

from celery import Celery

app = Celery("defaults", broker=os.environ["REDIS_URL"])
'''
# Enqueues --tasks no-op tasks (Celery's built-in celery.accumulate) at once and times until the
# queue is empty and nothing is unacknowledged (with early acks, at most one task per process may
# still be running then: a no-op's microseconds).
CELERY_CLIENT = '''
import json, os, sys, time
import redis
{app}
r = redis.Redis.from_url(os.environ["REDIS_URL"])
def drained():
    return r.llen("celery") == 0 and r.hlen("unacked") == 0
def burst(n):
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            # As the project's code enqueues (a task's delay/apply_async): Celery 5.6.3 stores a
            # result for each task sent by name (send_task), task_ignore_result or not.
            app.tasks["celery.accumulate"].apply_async((1,), producer=producer)
    enqueued = time.perf_counter() - start
    while not drained():
        time.sleep(0.002)
    return n / (time.perf_counter() - start), n / enqueued
burst(50)  # warm up: connections, pool processes
rate, enqueue_rate = burst({tasks})
print("JSON " + json.dumps(dict(rate=rate, enqueue_rate=enqueue_rate)))
'''


class Server:
    """A gunicorn started in the foreground, in its own session, with its own port."""

    def __init__(self, name, args, cwd, env, port, path="/"):
        self.name, self.args, self.cwd, self.env, self.port, self.path = name, args, cwd, env, port, path
        self.proc = None

    def start(self):
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        first_200 = stack.wait_for_200(self.url(self.path), timeout=60)
        return first_200 - started

    def url(self, path=None):
        return f"http://127.0.0.1:{self.port}{path or self.path}"

    def tree(self):
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            services.stop_group(self.proc, timeout=40)


def cpu_seconds(processes):
    """CPU time (user + system) the processes have used so far, with that of their children
    already reaped (a replaced worker's): per request, a figure that other work on a shared
    machine barely moves, unlike req/s."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


class CeleryTarget:
    """A Celery worker and the client that times it, on its own Redis database."""

    def __init__(self, name, cwd, worker_args, client_args, env):
        self.name, self.cwd, self.worker_args, self.client_args, self.env = (
            name, cwd, worker_args, client_args, env)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            self.worker_args, cwd=self.cwd, env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def measure(self, tasks):
        out = subprocess.run(self.client_args(tasks), cwd=self.cwd, env=self.env,
                             capture_output=True, text=True, timeout=600)
        lines = [line for line in out.stdout.splitlines() if line.startswith("JSON ")]
        if out.returncode or not lines:
            raise RuntimeError(f"celery client for {self.name} failed:\n{out.stdout}{out.stderr}")
        return json.loads(lines[-1][5:])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            services.stop_group(self.proc, timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    parser.add_argument("--before", default="main",
                        help="git revision of the template to compare with, e.g. the commit a branch"
                             " started from ('' for none)")
    parser.add_argument("--tasks", type=int, default=2000, help="Celery no-op tasks per burst")
    args = parser.parse_args()
    # Stopped with SIGTERM, still stop the servers it started (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))
    seconds = max(1, int(args.seconds))
    load_before = " ".join(f"{x:.1f}" for x in psutil.getloadavg())

    tmp = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    pg, redis = services.Postgres().start(), services.redis().start()
    servers, workers = [], []
    try:
        (tmp / "project").mkdir()
        build = stack.Build(tmp / "project")
        config = stack.config_vars(pg, redis, WEB_CONCURRENCY=str(WORKERS))
        stack.release(build, config)
        builds = {"web": (build, config)}
        if args.before:
            (tmp / "before").mkdir()
            template = stack.template_at(args.before, tmp / "before-template")
            before = stack.Build(tmp / "before", template=template)
            pg.sql("CREATE DATABASE before")
            before_config = {**config, "DATABASE_URL": pg.url.rsplit("/", 1)[0] + "/before"}
            stack.release(before, before_config)
            builds["before"] = (before, before_config)

        # The ceiling and Django's plain startproject, on the project's own gunicorn and Django.
        (tmp / "hello").mkdir()
        (tmp / "hello" / "hello.py").write_text(WSGI_HELLO)
        stack.plain_django(tmp / "plain_site", build.bin / "django-admin")
        gunicorn = str(build.bin / "gunicorn")
        sync = ["--workers", str(WORKERS), "--worker-class", "sync", "--log-level", "warning"]

        def make_servers():
            made = []
            port = services.free_port()
            made.append(Server("ceiling", [gunicorn, *sync, "--bind", f"127.0.0.1:{port}", "hello:app"],
                               tmp / "hello", build.env({}), port))
            port = services.free_port()
            made.append(Server("plain", [gunicorn, *sync, "--bind", f"127.0.0.1:{port}", "plain.wsgi"],
                               tmp / "plain_site", build.env({}), port))
            for name, (b, c) in builds.items():
                port = services.free_port()
                # The Procfile's web line, as honcho/Heroku run it (PORT from the environment).
                made.append(Server(name, ["bash", "-c", b.processes["web"]], b.path,
                                   b.env({**c, "PORT": str(port)}), port))
            return made

        # Time to the first 200, median of 3 (each start alone on the machine).
        starts = {}
        for _ in range(3):
            for server in make_servers():
                starts.setdefault(server.name, []).append(server.start())
                server.stop()

        servers = make_servers()
        for server in servers:
            server.start()
        by_name = {s.name: s for s in servers}

        # Celery: each worker on its own Redis database, so none takes another's tasks.
        base = redis.url.rsplit("/", 1)[0]  # redis://127.0.0.1:PORT
        client_code = {
            "project": "from celery import current_app as app\napp.loader.import_default_modules()",
            "defaults": "sys.path.insert(0, '.')\nfrom celery_defaults import app",
        }

        def project_worker(name, b, c, db):
            env = b.env({**c, "REDIS_URL": f"{base}/{db}"})
            line = b.processes["worker"].replace("newrelic-admin run-program", "")
            worker = [*shlex.split(line), "--loglevel", "WARNING"]
            code = CELERY_CLIENT.format(app=client_code["project"], tasks="{tasks}")
            return CeleryTarget(
                name, b.path, ["bash", "-c", shlex.join(worker)],
                lambda n: ["python", "manage.py", "shell", "--no-imports", "-c", code.format(tasks=n)], env)

        celery_targets = [project_worker("project", build, config, 1)]
        (build.path / "celery_defaults.py").write_text(CELERY_DEFAULTS)
        defaults_code = CELERY_CLIENT.format(app=client_code["defaults"], tasks="{tasks}")
        celery_targets.append(CeleryTarget(
            "defaults", build.path,
            [str(build.bin / "celery"), "-A", "celery_defaults", "worker", "--concurrency", str(WORKERS),
             "--loglevel", "WARNING"],
            lambda n: [str(build.bin / "python"), "-c", defaults_code.format(tasks=n)],
            build.env({"REDIS_URL": f"{base}/2"})))
        if "before" in builds:
            celery_targets.append(project_worker("before", *builds["before"], 3))
        workers = celery_targets
        for worker in workers:
            worker.start()
        time.sleep(5)  # the workers connect and fork their processes

        runs = {}
        for _ in range(args.rounds):
            for connections in (32, 128):
                for server in servers:
                    before = cpu_seconds(server.tree())
                    result = stack.wrk(server.url(), connections, seconds)
                    result["cpu_us"] = (cpu_seconds(server.tree()) - before) / result["requests"] * 1e6
                    runs.setdefault(("hello", server.name, connections), []).append(result)
            for name in builds:
                url = by_name[name].url("/parity/sleep/?s=0.05")
                result = stack.wrk(url, 256, seconds, timeout="30s")
                runs.setdefault(("io", name, 256), []).append(result)
            for worker in workers:
                runs.setdefault(("celery", worker.name), []).append(worker.measure(args.tasks))

        pss = {s.name: stack.pss_mb(s.tree()) for s in servers}
    finally:
        for server in servers:
            server.stop()
        for worker in workers:
            worker.stop()
        pg.close()
        redis.close()

    def med(key, field):
        return statistics.median(r[field] for r in runs[key])

    def errors(key):
        return sum(r["non_2xx"] + r["socket_errors"] for r in runs[key])

    names = [s.name for s in servers]
    print(f"wrk {seconds} s per run, {args.rounds} interleaved rounds, medians; {WORKERS} workers each;"
          f" load average before: {load_before}; before = the template at {args.before or '-'}")
    print(f"{'hello page':<10}{'conns':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99/p50':>9}"
          f"{'errors':>8}{'/plain':>8}{'/ceiling':>10}{'CPU us/req':>12}")
    figures = {"hello": {}, "io": {}, "celery": {}, "pss_mb": pss, "first_200_ms": {}}
    for connections in (32, 128):
        ceiling = med(("hello", "ceiling", connections), "rps")
        plain = med(("hello", "plain", connections), "rps")
        for name in names:
            key = ("hello", name, connections)
            rps, p50, p99 = med(key, "rps"), med(key, "p50_ms"), med(key, "p99_ms")
            cpu_us = med(key, "cpu_us")
            print(f"{name:<10}{connections:>6}{rps:>9.0f}{p50:>9.1f}{p99:>9.1f}{p99 / p50:>9.1f}"
                  f"{errors(key):>8}{rps / plain:>8.2f}{rps / ceiling:>10.3f}{cpu_us:>12.0f}")
            figures["hello"][f"{name}@{connections}"] = {
                "rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors(key), "cpu_us": cpu_us,
                "ratio_to_plain": rps / plain, "ratio_to_ceiling": rps / ceiling,
            }
    bound = WORKERS * POOL_SIZE / 0.05
    print(f"\n50 ms database wait, 256 connections, bound {bound:.0f} req/s ({WORKERS} x {POOL_SIZE} / 0.05 s):")
    for name in builds:
        key = ("io", name, 256)
        rps = med(key, "rps")
        print(f"  {name:<8} {rps:.0f} req/s = {rps / bound:.2f} of the bound, p50 {med(key, 'p50_ms'):.0f} ms,"
              f" errors {errors(key)}")
        figures["io"][name] = {"rps": rps, "ratio_to_bound": rps / bound, "errors": errors(key)}
    print(f"\nCelery, {args.tasks} no-op tasks enqueued at once, {WORKERS} worker processes, same Redis:")
    defaults = med(("celery", "defaults"), "rate")
    for worker in workers:
        key = ("celery", worker.name)
        rate = med(key, "rate")
        print(f"  {worker.name:<8} {rate:.0f} tasks/s done ({med(key, 'enqueue_rate'):.0f}/s enqueued),"
              f" {rate / defaults:.2f} of Celery's defaults")
        figures["celery"][worker.name] = {"rate": rate, "enqueue_rate": med(key, "enqueue_rate"),
                                          "ratio_to_defaults": rate / defaults}
    print("\nPSS after load (shared pages counted once): "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in pss.items()))
    for name, times in starts.items():
        figures["first_200_ms"][name] = statistics.median(times) * 1000
    print("start to first 200 (median of 3): "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in figures["first_200_ms"].items()))

    web = figures["hello"]
    goals = [
        ("req/s >= 0.9 of plain at 32 and 128",
         all(web[f"web@{c}"]["ratio_to_plain"] >= 0.9 for c in (32, 128)),
         " / ".join(f"{web[f'web@{c}']['ratio_to_plain']:.2f}" for c in (32, 128))),
        # The median of rounds; soak.py gives it over all requests of a long load.
        ("p99 <= 3x p50 at 32", web["web@32"]["p99_ms"] <= 3 * web["web@32"]["p50_ms"],
         f"{web['web@32']['p99_ms'] / web['web@32']['p50_ms']:.1f}x"),
        ("no errors", all(v["errors"] == 0 for k, v in web.items() if k.startswith("web@"))
         and figures["io"]["web"]["errors"] == 0, ""),
        ("web PSS <= 100 MB", pss["web"] <= 100, f"{pss['web']:.0f} MB"),
        ("start to first 200 <= 1.0 s", figures["first_200_ms"]["web"] <= 1000,
         f"{figures['first_200_ms']['web']:.0f} ms"),
        ("database wait >= 0.9 of the bound", figures["io"]["web"]["ratio_to_bound"] >= 0.9,
         f"{figures['io']['web']['ratio_to_bound']:.2f}"),
        ("Celery >= 0.5 of its defaults", figures["celery"]["project"]["ratio_to_defaults"] >= 0.5,
         f"{figures['celery']['project']['ratio_to_defaults']:.2f}"),
    ]
    print("\nGoals (web):")
    for what, met, figure in goals:
        print(f"  {'met    ' if met else 'NOT met'}  {what}: {figure}")
    print("JSON " + json.dumps(figures))


if __name__ == "__main__":
    main()
