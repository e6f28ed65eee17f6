"""Celery on Redis: enqueue-to-done latency (p50/p99) and tasks per second for a no-op task.

Renders a new project (or uses --project PATH, one already set up by bin/setup), starts a Redis
on loopback and the Procfile's worker (WEB_CONCURRENCY=2 processes, with the project's
lose-nothing settings: late acks, prefetch 1), and times Celery's built-in no-op task.
Each task asks for its result, stored where the project stores results (the database). Tasks
per second against Celery's defaults, in one run with the web figures: .ci/bench/parity.py.
Run: .ci/.venv/bin/python .ci/bench/celery.py
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import services  # noqa: E402
from conftest import PROJECT_PYTHON, readme_command, render  # noqa: E402

CLIENT = """
import json, statistics, time
from celery import current_app as app
from celery.result import ResultSet
app.loader.import_default_modules()
# The project stores results only for tasks that ask (CELERY_TASK_IGNORE_RESULT): these ask.
noop = lambda: app.send_task("celery.accumulate", (1,), ignore_result=False)
for _ in range(20):  # warm up: connections, pool processes
    noop().get(timeout=30)
latencies = []
for _ in range({latency_tasks}):
    start = time.perf_counter()
    noop().get(timeout=30)
    latencies.append(time.perf_counter() - start)
start = time.perf_counter()
results = [noop() for _ in range({burst_tasks})]
enqueued = time.perf_counter() - start
ResultSet(results).join_native(timeout=120)  # fetches finished results in batches
elapsed = time.perf_counter() - start
q = statistics.quantiles(latencies, n=100)
print(json.dumps(dict(p50=q[49], p99=q[98], rate=len(results) / elapsed, enqueue_rate=len(results) / enqueued)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="a rendered project with its .venv")
    parser.add_argument("--latency-tasks", type=int, default=500)
    parser.add_argument("--burst-tasks", type=int, default=2000)
    args = parser.parse_args()

    project = args.project
    if project is None:
        project = render(Path(tempfile.mkdtemp(prefix="bench-celery-")), readme_command())
        subprocess.run(["bin/setup"], cwd=project, check=True, env={**os.environ, "PYTHON": PROJECT_PYTHON}, stdout=subprocess.DEVNULL)
    python = str(project / ".venv" / "bin" / "python")

    redis = services.redis().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CLOUDAMQP_"))}
    env.update(REDIS_URL=redis.url, CELERY_RESULT_BACKEND=redis.url, WEB_CONCURRENCY="2")
    line = next(l for l in (project / "Procfile").read_text().splitlines() if l.startswith("worker:"))
    command = shlex.split(line.split(":", 1)[1].replace("newrelic-admin run-program", ""))
    worker = subprocess.Popen(
        [python, *command[1:], "--loglevel", "WARNING"], cwd=project, env=env,
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)
        code = CLIENT.format(latency_tasks=args.latency_tasks, burst_tasks=args.burst_tasks)
        out = subprocess.run(
            [python, "manage.py", "shell", "--no-imports", "-c", code],
            cwd=project, env=env, capture_output=True, text=True,
        )
        if out.returncode:
            sys.exit(out.stdout + out.stderr)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        redis.close()

    print(f"Celery {args.latency_tasks} no-op tasks one at a time, Redis broker, 2 worker processes:")
    print(f"  enqueue-to-done latency  p50 {figures['p50'] * 1000:.1f} ms   p99 {figures['p99'] * 1000:.1f} ms")
    print(f"{args.burst_tasks} no-op tasks enqueued at once:")
    print(f"  {figures['rate']:.0f} tasks/s done   ({figures['enqueue_rate']:.0f} tasks/s enqueued)")
    print(f"  ratio done/enqueued: {figures['rate'] / figures['enqueue_rate']:.2f}")


if __name__ == "__main__":
    main()
