#!/usr/bin/env python
"""Production-parity benchmark: figures and ratios from ONE interleaved run, no assertions.

    .ci/.venv/bin/python .ci/bench/parity.py [--seconds 5] [--rounds 3]

Targets, all on this machine with 2 workers each, against real Postgres and Redis on loopback:
  ceiling  a 5-line WSGI hello app under gunicorn, 2 sync workers (what this machine can do)
  plain    Django's own `startproject` page under gunicorn, 2 sync workers
  web      the new project's Procfile `web` (gunicorn.conf.py: gevent) with prod settings
  sync     the same app and settings on 2 sync workers (--worker-class sync)
Measured: hello page req/s and p50/p99 at 32 and 128 connections; an I/O-bound page (a 50 ms
database wait, pg_sleep) at 256 connections for web and sync, beside the bound the connection
limit sets (WEB_CONCURRENCY x DATABASE_POOL_SIZE / 0.05 s); RSS of the web and worker process
trees after load; time from start to the first 200 (median of 3).
"""

import argparse
import json
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


class Server:
    """A gunicorn (or honcho) started in the foreground, with its own port."""

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
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    args = parser.parse_args()
    seconds = max(1, int(args.seconds))
    load_before = " ".join(f"{x:.1f}" for x in psutil.getloadavg())

    tmp = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    pg, redis = services.Postgres().start(), services.redis().start()
    servers = []
    try:
        (tmp / "project").mkdir()
        build = stack.Build(tmp / "project")
        config = stack.config_vars(pg, redis, WEB_CONCURRENCY=str(WORKERS))
        for step in ("python manage.py collectstatic --noinput", build.processes["release"]):
            done = build.run(step, config)
            assert done.returncode == 0, done.stdout + done.stderr

        # The ceiling and Django's plain startproject page, on the project's own gunicorn and Django.
        (tmp / "hello").mkdir()
        (tmp / "hello" / "hello.py").write_text(WSGI_HELLO)
        (tmp / "plain_site").mkdir()
        subprocess.run([str(build.bin / "django-admin"), "startproject", "plain", str(tmp / "plain_site")],
                       check=True, cwd=tmp)
        gunicorn = str(build.bin / "gunicorn")
        sync = ["--workers", str(WORKERS), "--worker-class", "sync", "--log-level", "warning"]

        def plain_servers():
            port_c, port_p = services.free_port(), services.free_port()
            return [
                Server("ceiling", [gunicorn, *sync, "--bind", f"127.0.0.1:{port_c}", "hello:app"],
                       tmp / "hello", build.env({}), port_c),
                Server("plain", [gunicorn, *sync, "--bind", f"127.0.0.1:{port_p}", "plain.wsgi"],
                       tmp / "plain_site", build.env({}), port_p),
            ]

        def project_servers():
            port_w, port_s = services.free_port(), services.free_port()
            return [
                # The Procfile's web line, as honcho/Heroku run it (PORT from the environment).
                Server("web", ["bash", "-c", build.processes["web"]], build.path,
                       build.env({**config, "PORT": str(port_w)}), port_w),
                Server("sync", [gunicorn, "--config", "gunicorn.conf.py", "--worker-class", "sync"],
                       build.path, build.env({**config, "PORT": str(port_s)}), port_s),
            ]

        # Time to the first 200, median of 3 (each start alone on the machine).
        starts = {}
        for _ in range(3):
            for server in [*plain_servers(), *project_servers()]:
                starts.setdefault(server.name, []).append(server.start())
                server.stop()

        servers = [*plain_servers(), *project_servers()]
        for server in servers:
            server.start()
        by_name = {s.name: s for s in servers}
        # The worker, for its memory: started the way honcho starts the Procfile's worker.
        worker = None
        if "worker" in build.processes:
            worker = stack.Honcho(build, config, processes=["worker"]).start()

        runs = {}
        for _ in range(args.rounds):
            for connections in (32, 128):
                for server in servers:
                    result = stack.wrk(server.url(), connections, seconds)
                    runs.setdefault(("hello", server.name, connections), []).append(result)
            for name in ("web", "sync"):
                url = by_name[name].url("/parity/sleep/?s=0.05")
                result = stack.wrk(url, 256, seconds, timeout="30s")
                runs.setdefault(("io", name, 256), []).append(result)

        rss = {name: stack.rss_mb(by_name[name].tree()) for name in ("web", "sync")}
        pss = {name: stack.pss_mb(by_name[name].tree()) for name in ("web", "sync")}
        if worker:
            rss["worker"] = stack.rss_mb(worker.processes_of("celery worker"))
            pss["worker"] = stack.pss_mb(worker.processes_of("celery worker"))
            worker.stop()
    finally:
        for server in servers:
            server.stop()
        pg.close()
        redis.close()

    def med(key, field):
        return statistics.median(r[field] for r in runs[key])

    def errors(key):
        return sum(r["non_2xx"] + r["socket_errors"] for r in runs[key])

    print(f"wrk {seconds} s per run, {args.rounds} interleaved rounds, medians; {WORKERS} workers each;"
          f" load average before: {load_before}")
    print(f"{'hello page':<12}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'/ceiling':>10}")
    figures = {"hello": {}, "io": {}, "rss_mb": rss, "pss_mb": pss, "first_200_s": {}}
    for connections in (32, 128):
        ceiling = med(("hello", "ceiling", connections), "rps")
        for name in ("ceiling", "plain", "web", "sync"):
            key = ("hello", name, connections)
            rps = med(key, "rps")
            print(f"{name:<12}{connections:>6}{rps:>10.0f}{med(key, 'p50_ms'):>9.1f}"
                  f"{med(key, 'p99_ms'):>9.1f}{errors(key):>8}{rps / ceiling:>10.2f}")
            figures["hello"][f"{name}@{connections}"] = {
                "rps": rps, "p50_ms": med(key, "p50_ms"), "p99_ms": med(key, "p99_ms"),
                "errors": errors(key), "ratio_to_ceiling": rps / ceiling,
            }
    bound = WORKERS * POOL_SIZE / 0.05
    web_io, sync_io = med(("io", "web", 256), "rps"), med(("io", "sync", 256), "rps")
    print(f"\n50 ms database wait, 256 connections: web (gevent) {web_io:.0f} req/s, "
          f"sync {sync_io:.0f} req/s, bound {bound:.0f} req/s ({WORKERS} x {POOL_SIZE} / 0.05 s)")
    print(f"  web / sync = {web_io / sync_io:.1f}x (goal 8x), web / bound = {web_io / bound:.2f} "
          f"(goal 0.9), errors web {errors(('io', 'web', 256))}, sync {errors(('io', 'sync', 256))}")
    figures["io"] = {"web_rps": web_io, "sync_rps": sync_io, "bound_rps": bound,
                     "web_over_sync": web_io / sync_io, "web_over_bound": web_io / bound,
                     "errors_web": errors(("io", "web", 256)), "errors_sync": errors(("io", "sync", 256))}
    print("\nRSS after load (sum over the process tree): "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()) + " (goal: web under 160 MB)")
    print("PSS after load (shared pages counted once): "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in pss.items()))
    for name, times in starts.items():
        figures["first_200_s"][name] = statistics.median(times)
    print("start to first 200 (median of 3): "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in figures["first_200_s"].items())
          + " (goal: web under 600 ms)")
    print("JSON " + json.dumps(figures))


if __name__ == "__main__":
    main()
