"""The production-parity stack, shared by .ci/tests/test_parity.py and .ci/bench/parity.py.

A project rendered from this template is built the way Heroku's Python buildpack builds it (a new
virtualenv from requirements.txt alone, `collectstatic --noinput` with only the config vars), the
Procfile's release line runs, and honcho starts the Procfile's processes (Foreman's rules: PORT,
the .env file) against real Postgres, Redis and memcached on loopback, under prod settings.

For measuring, a tiny app is added to the rendered copy only (never to the template): /parity/db/
reads the database, /parity/sleep/?s=0.05 waits in the database (pg_sleep).
"""

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

TEMPLATE = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TEMPLATE / ".ci" / "tests"))

import services  # noqa: E402
from conftest import NAME, render  # noqa: E402

PROJECT_PYTHON = os.environ.get("PROJECT_PYTHON", "python3.13")
# Heroku Postgres essential-0's connection limit: the defaults must fit it.
PLAN_CONNECTION_LIMIT = 20

PARITY_VIEWS = '''\
from django.contrib.auth.models import Permission
from django.db import connection
from django.http import JsonResponse
from django.urls import path


def db(request):
    names = list(Permission.objects.order_by("id").values_list("codename", flat=True)[:10])
    return JsonResponse({"permissions": names})


def sleep(request):
    seconds = float(request.GET.get("s", "0.05"))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])
    return JsonResponse({"slept": seconds})


urlpatterns = [path("parity/db/", db), path("parity/sleep/", sleep)]
'''


def add_parity_app(path, name=NAME):
    """The measuring pages, in the rendered copy only: a urls module and one line in urls.py."""
    app = path / name / "apps" / "parity"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "urls.py").write_text(PARITY_VIEWS)
    with open(path / name / "urls.py", "a") as urls:
        urls.write(f'\nurlpatterns += [path("", include("{name}.apps.parity.urls"))]\n')


def procfile(path):
    """The Procfile's processes, {name: command}, in order."""
    lines = (path / "Procfile").read_text().splitlines()
    return dict(
        (m.group(1), m.group(2).strip())
        for m in (re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line) for line in lines)
        if m
    )


def template_at(ref, dest):
    """The template as it is at git revision `ref` (say, main), in the folder `dest`: to measure
    a change against what it replaces, in the same run."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=TEMPLATE, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def render_from(template, tmp, name=NAME):
    """startproject from another copy of the template (render() uses this checkout)."""
    django_admin = Path(sys.executable).with_name("django-admin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    subprocess.run(
        [str(django_admin), "startproject", f"--template={template}", "--extension=py,html", name],
        cwd=tmp, check=True, env=env,
    )
    return Path(tmp) / name


PLAIN_VIEW = '''\
from django.shortcuts import render
from django.urls import path


def hello(request):
    return render(request, "hello.html", {"name": "plain"})


urlpatterns = [path("", hello)]
'''
PLAIN_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Hello</title></head>
<body><main><h1>Hello from {{ name }}</h1><p>Django, pages by its own template language.</p></main></body>
</html>
"""


def plain_django(dest, django_admin):
    """Django's own `startproject`, DEBUG off, with one view rendering a template: the anchor a
    project template has to keep up with. Its WSGI module is plain.wsgi, in `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(django_admin), "startproject", "plain", str(dest)], check=True, cwd=dest)
    (dest / "plain" / "templates").mkdir()
    (dest / "plain" / "templates" / "hello.html").write_text(PLAIN_TEMPLATE)
    (dest / "plain" / "hello.py").write_text(PLAIN_VIEW)
    settings = dest / "plain" / "settings.py"
    text = settings.read_text().replace("DEBUG = True", "DEBUG = False")
    text = text.replace("ALLOWED_HOSTS = []", 'ALLOWED_HOSTS = ["127.0.0.1", "localhost"]')
    text += '\nROOT_URLCONF = "plain.hello"\nTEMPLATES[0]["DIRS"] = [BASE_DIR / "plain" / "templates"]\n'
    settings.write_text(text)
    return dest


class Build:
    """A fresh project built as the buildpack builds it: .venv from requirements.txt alone.
    From this checkout, or from another copy of the template (`template`, see template_at)."""

    def __init__(self, tmp, python=PROJECT_PYTHON, parity_app=True, template=None):
        self.path = render_from(template, Path(tmp)) if template else render(Path(tmp))
        if parity_app:
            add_parity_app(self.path)
        subprocess.run([python, "-m", "venv", ".venv"], cwd=self.path, check=True)
        subprocess.run(
            [".venv/bin/python", "-m", "pip", "install", "--quiet", "--requirement", "requirements.txt"],
            cwd=self.path, check=True,
        )
        self.processes = procfile(self.path)

    @property
    def bin(self):
        return self.path / ".venv" / "bin"

    def env(self, config):
        """What a dyno's process sees: the config vars, PATH with the app's virtualenv first."""
        return {"PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.path), **config}

    def run(self, command, config, **kw):
        kw.setdefault("timeout", 300)
        return subprocess.run(
            ["bash", "-c", command], cwd=self.path, env=self.env(config),
            capture_output=True, text=True, **kw,
        )

    def write_env_file(self, config):
        (self.path / ".env").write_text("".join(f"{k}={v}\n" for k, v in config.items()))


def config_vars(postgres, redis=None, memcached=None, **extra):
    """The config vars Heroku's add-ons and `fab heroku_setup` would set, for loopback servers."""
    config = {
        "DJANGO_SETTINGS_MODULE": f"{NAME}.settings.prod",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DATABASE_URL": postgres.url,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        # Loopback has no TLS: Heroku's router ends it, and Heroku Postgres needs it.
        "DATABASE_SSL_REQUIRE": "false",
        "SECURE_SSL_REDIRECT": "false",
        "WEB_CONCURRENCY": "2",
    }
    if redis:
        config["REDIS_URL"] = redis.url
    if memcached:
        config["MEMCACHIER_SERVERS"] = memcached.servers
    return {**config, **extra}


class Honcho:
    """`honcho start` of the Procfile's processes (all but release), as Heroku starts dynos."""

    def __init__(self, build, config, processes=None, base_port=None):
        self.build, self.config = build, config
        self.names = processes or [n for n in build.processes if n != "release"]
        self.base_port = base_port or services.free_port()
        self.log = build.path / "honcho.log"
        self.proc = None
        self.port = None

    def start(self, timeout=60):
        self.build.write_env_file(self.config)
        honcho = Path(sys.executable).with_name("honcho")
        self.log.write_text("")
        self.proc = subprocess.Popen(
            [str(honcho), "--env", ".env", "start", "--port", str(self.base_port), *self.names],
            cwd=self.build.path, env=self.build.env({}), stdout=open(self.log, "a"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        if "web" in self.names:
            deadline = time.monotonic() + timeout
            while not (m := re.search(r"Listening at: http://[0-9.]+:(\d+)", self.log.read_text())):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"web did not start:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.1)
            self.port = int(m.group(1))
            wait_for_200(self.url("/"), timeout=timeout)
        return self

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def tail(self, lines=60):
        """The end of honcho's log, without the access log: for failure messages."""
        text = [line for line in self.log.read_text().splitlines() if '"GET ' not in line]
        return "\n".join(text[-lines:])

    def tree(self):
        return [self.proc_info(), *psutil.Process(self.proc.pid).children(recursive=True)]

    def proc_info(self):
        return psutil.Process(self.proc.pid)

    def master(self, word):
        """The main process of a Procfile process whose command holds `word` (not the shell that
        honcho starts it with, not its forked children)."""
        ours = [p for p in self.processes_of(word) if p.name() not in ("sh", "bash", "dash")]
        pids = {p.pid for p in ours}
        masters = [p for p in ours if p.ppid() not in pids]
        if len(masters) != 1:
            raise RuntimeError(f"not one {word} main process under honcho: {masters}")
        return masters[0]

    def gunicorn_master(self):
        return self.master("gunicorn")

    def processes_of(self, word):
        """Processes under honcho whose command line holds `word` (e.g. 'gunicorn', 'worker')."""
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if word in " ".join(p.cmdline()):
                    found.append(p)
        return found

    def stop(self, timeout=30):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Anything left in the session (a process that ignored SIGTERM) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    close = stop


def get(url, timeout=10, headers=None):
    """(status, body) of one GET; HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for_200(url, timeout=30):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, _ = get(url, timeout=5)
            if status == 200:
                return time.monotonic()
            last = status
        except OSError as error:
            last = error
        time.sleep(0.05)
    raise TimeoutError(f"{url} gave no 200 within {timeout} s (last: {last})")


WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"p50\\": %d, \\"p99\\": %d}\\n",
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk(url, connections, seconds, threads=2, timeout="10s"):
    """One wrk run; returns requests, req/s, non-2xx, socket errors, p50/p99 in ms."""
    # One script per thread: wrk runs started at once must not read one being rewritten.
    script = Path("/tmp") / f"wrk-parity-{os.getpid()}-{threading.get_ident()}.lua"
    script.write_text(WRK_LUA)
    out = subprocess.run(
        ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s",
         f"--timeout={timeout}", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout
    result = {"output": out}
    result["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    result["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(map(int, errors.groups())) if errors else 0
    latency = json.loads(re.search(r"^JSON (.*)$", out, re.M).group(1))
    result["p50_ms"], result["p99_ms"] = latency["p50"] / 1000, latency["p99"] / 1000
    return result


class ConnectionSampler:
    """Counts the database's client connections (pg_stat_activity) every interval, in a thread,
    in all and for each group of processes (a callable giving psutil processes, e.g. web's tree)."""

    def __init__(self, postgres, groups=None, interval=0.1):
        self.postgres, self.groups, self.interval = postgres, groups or {}, interval
        self.samples = []  # {"total": n, group: n}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ports(self, processes):
        ports = set()
        for p in processes:
            with contextlib.suppress(psutil.Error):
                ports |= {
                    c.laddr.port for c in p.net_connections("tcp")
                    if c.raddr and c.raddr.port == self.postgres.port
                }
        return ports

    def _run(self):
        query = (
            "SELECT coalesce(string_agg(client_port::text, ','), '') FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        while not self._stop.is_set():
            with contextlib.suppress(subprocess.CalledProcessError):
                ports = {int(p) for p in self.postgres.sql(query).split(",") if p}
                sample = {"total": len(ports)}
                for name, processes in self.groups.items():
                    sample[name] = len(ports & self._ports(processes()))
                self.samples.append(sample)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def peak(self, group="total"):
        return max((s.get(group, 0) for s in self.samples), default=0)


def rss_mb(processes):
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def pss_mb(processes):
    """Proportional set size: shared pages counted once across the tree, as a dyno's memory is."""
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / 2**20


def release(build, config):
    """What Heroku does before a release takes traffic: the build's collectstatic, then the
    Procfile's release line."""
    for step in ("python manage.py collectstatic --noinput", build.processes["release"]):
        done = build.run(step, config)
        assert done.returncode == 0, done.stdout + done.stderr
