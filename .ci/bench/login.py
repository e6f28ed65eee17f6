#!/usr/bin/env python
"""Login throttling benchmark: the hello page's req/s alone and beside 4 password guessers.

    .ci/.venv/bin/python .ci/bench/login.py [--seconds 10] [--rounds 3] [--before main]

The new project is built as Heroku's buildpack builds it (.ci/parity/stack.py) and its Procfile's
web line runs with prod settings (WEB_CONCURRENCY=2) against real Postgres and Redis on loopback.
wrk loads the hello page at 32 connections, alone, then while 4 guessers (one process each, one
keep-alive connection each) POST wrong passwords to the admin's login form as fast as they get
answers, in two ways: all from one address for one account, and each from its own address
(X-Forwarded-For, as Heroku's router forwards it) for its own account. Before each loaded run,
`manage.py axes_reset` lifts the lockouts, so every run pays for the guesses before a lockout.
With --before REV, the template at that revision (no throttling) is measured the same way.
Prints medians of the interleaved rounds; asserts nothing.
"""

import argparse
import json
import os
import shutil
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

GUESSERS = 4
CONNECTIONS = 32
# One guesser: GET the login form (CSRF cookie and token), then POST wrong passwords until told to
# stop; prints how many answers of each status it got.
GUESSER = r"""
import http.client, json, re, sys, time
port, address, username, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
host = f"127.0.0.1:{port}"
base = {"Host": host, "X-Forwarded-Proto": "https", "X-Forwarded-For": address}
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
conn.request("GET", "/admin/login/", headers=base)
response = conn.getresponse()
page = response.read().decode()
cookie = re.search(r"csrftoken=([^;]+)", response.getheader("Set-Cookie")).group(1)
token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
headers = {**base, "Cookie": f"csrftoken={cookie}", "Origin": f"https://{host}",
           "Referer": f"https://{host}/", "Content-Type": "application/x-www-form-urlencoded"}
statuses = {}
deadline = time.monotonic() + seconds
n = 0
while time.monotonic() < deadline:
    n += 1
    body = f"csrfmiddlewaretoken={token}&username={username}&password=guess-{n}"
    conn.request("POST", "/admin/login/", body, headers)
    status = conn.getresponse()
    status.read()
    statuses[status.status] = statuses.get(status.status, 0) + 1
print("JSON " + json.dumps(statuses))
"""


class Web:
    """The Procfile's web line of one build, on its own port."""

    def __init__(self, name, build, config):
        self.name, self.build, self.config = name, build, config
        self.port = services.free_port()
        self.proc = subprocess.Popen(
            ["bash", "-c", build.processes["web"]], cwd=build.path,
            env=build.env({**config, "PORT": str(self.port)}), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        stack.wait_for_200(self.url("/"), timeout=90)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        if self.proc.poll() is None:
            services.stop_group(self.proc, timeout=40)


def reset_lockouts(web):
    done = web.build.run("python manage.py axes_reset", web.config)
    # The template before throttling has no axes_reset: nothing to lift there.
    assert done.returncode == 0 or "Unknown command" in done.stderr, done.stderr


def loaded(web, seconds, spread):
    """wrk on the hello page while the guessers run; (wrk result, statuses the guessers got)."""
    reset_lockouts(web)
    guessers = []
    for n in range(GUESSERS):
        address = f"198.51.100.{n + 1}" if spread else "198.51.100.1"
        username = f"guess{n}" if spread else "admin"
        guessers.append(subprocess.Popen(
            [sys.executable, "-c", GUESSER, str(web.port), address, username, str(seconds + 2)],
            stdout=subprocess.PIPE, text=True,
        ))
    time.sleep(0.5)  # each has its form and is guessing
    result = stack.wrk(web.url("/"), CONNECTIONS, seconds)
    statuses = {}
    for guesser in guessers:
        out, _ = guesser.communicate(timeout=seconds + 120)
        for status, count in json.loads(out.split("JSON ", 1)[1]).items():
            statuses[status] = statuses.get(status, 0) + count
    return result, statuses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    parser.add_argument("--before", default="", help="git revision of the template to compare with")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))
    load_before = " ".join(f"{x:.1f}" for x in psutil.getloadavg())

    tmp = Path(tempfile.mkdtemp(prefix="bench-login-"))
    pg, redis = services.Postgres().start(), services.redis().start()
    webs = []
    try:
        (tmp / "project").mkdir()
        build = stack.Build(tmp / "project", parity_app=False)
        config = stack.config_vars(pg, redis, WEB_CONCURRENCY="2")
        stack.release(build, config)
        builds = [("web", build, config)]
        if args.before:
            (tmp / "before").mkdir()
            template = stack.template_at(args.before, tmp / "before-template")
            before = stack.Build(tmp / "before", template=template, parity_app=False)
            pg.sql("CREATE DATABASE before")
            before_config = {**config, "DATABASE_URL": pg.url.rsplit("/", 1)[0] + "/before"}
            stack.release(before, before_config)
            builds.append(("before", before, before_config))
        webs = [Web(name, b, c) for name, b, c in builds]

        runs = {}
        for _ in range(args.rounds):
            for web in webs:
                stack.wrk(web.url("/"), CONNECTIONS, 2)  # warm up
                runs.setdefault((web.name, "alone"), []).append(
                    (stack.wrk(web.url("/"), CONNECTIONS, args.seconds), {}))
                for spread in (False, True):
                    key = (web.name, "4 addresses" if spread else "1 address")
                    runs.setdefault(key, []).append(loaded(web, args.seconds, spread))

        load_after = " ".join(f"{x:.1f}" for x in psutil.getloadavg())
        print(f"hello page at {CONNECTIONS} connections, {args.seconds} s per run, medians of "
              f"{args.rounds} rounds; {GUESSERS} guessers; load average {load_before} -> {load_after}")
        print(f"{'target':8} {'guessers':12} {'req/s':>8} {'of alone':>9} {'p99 ms':>8}  guesses answered")
        for web in webs:
            alone = statistics.median(r["rps"] for r, _ in runs[(web.name, "alone")])
            for kind in ("alone", "1 address", "4 addresses"):
                results = runs[(web.name, kind)]
                rps = statistics.median(r["rps"] for r, _ in results)
                p99 = statistics.median(r["p99_ms"] for r, _ in results)
                answered = {}
                for _, statuses in results:
                    for status, count in statuses.items():
                        answered[status] = answered.get(status, 0) + count
                answers = ", ".join(f"{s}: {c // len(results)}" for s, c in sorted(answered.items()))
                print(f"{web.name:8} {kind:12} {rps:8.0f} {rps / alone:8.0%} {p99:8.1f}  "
                      f"{answers or '-'}{' per run' if answers else ''}")
    finally:
        for web in webs:
            web.stop()
        pg.close()
        redis.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    main()
