"""Production services against real servers: the new project's web process (the Procfile's `web`
line, under newrelic-admin) with a real Redis, a real memcached that requires SASL, PostgreSQL, and
a Sentry endpoint on loopback that receives sentry-sdk's real envelopes."""

import gzip
import http.client
import http.server
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import NAME, services

SASL_USER, SASL_PASSWORD = "ciuser", "ci-secret-pw"


# --- Servers -------------------------------------------------------------------------------------


class SaslMemcached(services.Process):
    """memcached -S: binary protocol only, SASL PLAIN against its own sasldb (as MemCachier)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="ci-mc-sasl-"))
        db = self.dir / "sasldb2"
        subprocess.run(
            [services.require("saslpasswd2"), "-p", "-a", "memcached", "-c", "-f", str(db), SASL_USER],
            input=SASL_PASSWORD, text=True, check=True, capture_output=True,
        )
        (self.dir / "memcached.conf").write_text(f"mech_list: plain\nsasldb_path: {db}\n")
        db.chmod(0o644)  # memcached drops to "nobody" when run as root
        self.dir.chmod(0o755)
        port = services.free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        super().__init__(
            [services.require("memcached"), "-S", "-l", "127.0.0.1", "-p", str(port), *user], port,
            env={**os.environ, "SASL_CONF_PATH": str(self.dir)},
        )
        self.servers = f"127.0.0.1:{port}"

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentryEndpoint:
    """Sentry's envelope endpoint on loopback: keeps each event that sentry-sdk sends."""

    def __init__(self):
        self.events = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                encoding = self.headers.get("Content-Encoding")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "br":
                    import brotli

                    body = brotli.decompress(body)
                endpoint.receive(self.path, body)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.dsn = f"http://publickey@127.0.0.1:{self.port}/1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, path, body):
        # An envelope: a header line, then (item header line, item payload line) pairs.
        lines = body.decode().split("\n")
        for header, payload in zip(lines[1::2], lines[2::2], strict=False):
            if json.loads(header).get("type") == "event":
                self.events.append({"path": path, **json.loads(payload)})

    def wait_for_event(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.events:
            time.sleep(0.1)
        assert self.events, "Sentry received no event"
        return self.events[-1]

    def close(self):
        self.server.shutdown()


class TlsRedis(services.Process):
    """Redis over TLS only, with a self-signed certificate: Heroku Key-Value Store's rediss://."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="ci-redis-tls-"))
        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=ci-redis", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )
        port = services.free_port()
        super().__init__(
            [services.require("redis-server"), "--port", "0", "--tls-port", str(port),
             "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"], port,
        )
        self.url = f"rediss://127.0.0.1:{port}/0"

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_redis():
    server = TlsRedis().start()
    yield server
    server.close()


class SmtpServer:
    """aiosmtpd on loopback: keeps each message it receives."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages = []
        server = self

        class Handler:
            async def handle_DATA(self, smtp, session, envelope):
                server.messages.append(envelope)
                return "250 OK"

        self.port = services.free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def wait_for_message(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.messages:
            time.sleep(0.1)
        assert self.messages, "the SMTP server received no message"
        return self.messages[-1]

    def close(self):
        self.controller.stop()


@pytest.fixture
def smtp():
    server = SmtpServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def sasl_memcached():
    server = SaslMemcached().start()
    yield server
    server.close()


@pytest.fixture
def sentry():
    endpoint = SentryEndpoint()
    yield endpoint
    endpoint.close()


# --- The new project in production ---------------------------------------------------------------


@pytest.fixture(scope="module")
def prod(project, postgres, redis):
    """The project with reqs/prod.txt installed and its database migrated under prod settings,
    Redis its broker (production's server processes refuse to start without one)."""
    project.install_prod()
    env = {
        "DJANGO_SETTINGS_MODULE": f"{NAME}.settings.prod",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DATABASE_URL": postgres.url,
        "DATABASE_SSL_REQUIRE": "false",
        "ALLOWED_HOSTS": "127.0.0.1",
        "WEB_CONCURRENCY": "1",
        "REDIS_URL": redis.url,
        # sentry-sdk takes a checkout's git commit as the release before Heroku's; a dyno has none.
        "GIT_DIR": os.devnull,
    }
    # What Heroku's build and release phase run.
    project.manage("collectstatic", "--noinput", env=env)
    project.manage("migrate", "--noinput", env=env)
    make_user = (
        "from django.contrib.auth.models import User; "
        "User.objects.filter(username='svc-boss').exists() or "
        "User.objects.create_superuser('svc-boss', 'boss@example.com', 'svc-Passw0rd-1')"
    )
    project.manage("shell", "-c", make_user, env=env)
    return project, env


class Process:
    """A line of the Procfile, started as Heroku would, its output kept."""

    def __init__(self, project, env, name):
        procfile = (project.path / "Procfile").read_text()
        self.command = re.search(rf"^{name}:\s*(.+)$", procfile, re.M).group(1)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            shlex.split(self.command), cwd=project.path, start_new_session=True,
            env=project.env(**env), stdout=self.log, stderr=subprocess.STDOUT,
        )

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def wait_for(self, text, timeout=60):
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"exited: {self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} in {self.output()}"
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            services.stop_group(self.proc)
        return self.output()


class Web(Process):
    """The Procfile's web process on its own port, and a tiny HTTP client for it."""

    def __init__(self, project, env):
        self.port = services.free_port()
        super().__init__(project, {**env, "PORT": str(self.port)}, "web")
        services.wait_for_port(self.port, timeout=60)
        self.cookies = {}

    def request(self, method, path, body=None, headers=None, https=True):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if https:  # as Heroku's router says for an HTTPS visitor
            sent["X-Forwarded-Proto"] = "https"
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if body is not None:
            body = urllib.parse.urlencode(body)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body, sent)
        response = conn.getresponse()
        text = response.read().decode()
        for header, value in response.getheaders():
            if header.lower() == "set-cookie":
                name, _, rest = value.partition("=")
                self.cookies[name] = rest.split(";")[0]
        conn.close()
        return response.status, dict(response.getheaders()), text

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def login(self, username="svc-boss", password="svc-Passw0rd-1"):
        _, _, page = self.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        origin = f"https://127.0.0.1:{self.port}"
        form = {"username": username, "password": password, "csrfmiddlewaretoken": token}
        status, headers, _ = self.request(
            "POST", "/admin/login/?next=/admin/", form, {"Origin": origin, "Referer": origin + "/"}
        )
        assert status == 302 and headers["Location"] == "/admin/", "the login failed"

    def logged_in(self):
        status, _, page = self.get("/admin/")
        return status == 200 and "Site administration" in page

    def health(self):
        status, _, body = self.get("/healthz", https=False)
        return status, json.loads(body)


def starter(prod, make):
    project, base = prod
    started = []

    def start(**env):
        process = make(project, {**base, **env})
        started.append(process)
        return process

    return start, started


@pytest.fixture
def web(prod):
    """Start the web process with extra environment: web(REDIS_URL=...)."""
    start, started = starter(prod, Web)
    yield start
    for process in started:
        process.stop()


@pytest.fixture
def worker(prod):
    """Start the Procfile's Celery worker with extra environment, and wait until it is ready."""

    def make(project, env):
        process = Process(project, env, "worker")
        process.wait_for("ready.", timeout=90)
        return process

    start, started = starter(prod, make)
    yield start
    for process in started:
        process.stop()


# --- Tests ---------------------------------------------------------------------------------------


def test_prod_boots_without_a_new_relic_license_key(web):
    server = web()

    assert server.command == "gunicorn --config gunicorn.conf.py"  # the agent starts in its config
    status, body = server.health()
    assert status == 200 and body == {"status": "ok", "database": "ok", "cache": "ok", "broker": "ok"}
    # Plain HTTP is redirected to HTTPS, except the health check above.
    assert server.get("/", https=False)[0] == 301
    status, _, page = server.get("/")
    assert status == 200 and f"Hello from {NAME}" in page
    out = server.stop()
    assert "Traceback" not in out, out
    # Each service that is off says so once per process, on stdout.
    assert out.count("new relic: NEW_RELIC_LICENSE_KEY is not set") == 1, out
    assert out.count("sentry: SENTRY_DSN is not set") == 1, out


def test_web_starts_new_relic_s_agent_when_a_license_key_is_set(web):
    # A collector on loopback that is not there: the agent logs its failure and the site works.
    server = web(NEW_RELIC_LICENSE_KEY="0" * 40, NEW_RELIC_LOG="stdout", NEW_RELIC_HOST="127.0.0.1")

    status, _, page = server.get("/")
    assert status == 200 and f"Hello from {NAME}" in page
    out = server.stop()
    assert "New Relic Python Agent (" in out, out
    assert "NEW_RELIC_LICENSE_KEY is not set" not in out, out
    # Each worker registers its own agent: none was registered in gunicorn's main process by the
    # request it answers before forking (the agent would warn that no data will be reported).
    assert "in a process different" not in out, out


@pytest.mark.parametrize(
    "name, process", [("web", "web process"), ("worker", "Celery worker"),
                      ("scheduler", "Celery scheduler (beat)")],
)
def test_prod_refuses_to_start_a_server_process_without_a_broker(prod, name, process):
    project, base = prod
    started = Process(project, {**base, "REDIS_URL": ""}, name)
    try:
        code = started.proc.wait(60)
    finally:
        out = started.stop()

    assert code != 0, out  # gunicorn too stops, rather than start new workers that stop
    line = (f"REDIS_URL and CLOUDAMQP_URL are not set: the {process} needs a broker for Celery in "
            "production, e.g. heroku addons:create heroku-redis:mini")
    assert line in out.splitlines(), out
    assert "Traceback" not in out, out


def test_pages_load_in_a_browser_with_a_strict_content_security_policy(prod, web):
    from chromium import Chromium

    site = web()
    site.login()
    status, headers, _ = site.get("/")
    policy = headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy, policy
    assert "Content-Security-Policy-Report-Only" not in headers
    pages = ["/", "/celery/", "/admin/", "/admin/auth/user/add/", "/admin/waffle/flag/add/"]
    with Chromium() as browser:
        # As Heroku's router says for an HTTPS visitor; the session of the login above.
        browser.call("Network.setExtraHTTPHeaders", headers={"X-Forwarded-Proto": "https"})
        browser.call("Network.setCookie", name="sessionid", value=site.cookies["sessionid"],
                     url=f"http://127.0.0.1:{site.port}/")
        visits = {page: browser.visit(f"http://127.0.0.1:{site.port}{page}") for page in pages}
        title = browser.evaluate("document.title")
        # The policy bites: an inline script added to the page does not run.
        inline_ran = browser.evaluate(
            "const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
            "document.body.appendChild(s); window.ran === 1"
        )
    site.stop()

    for page, visit in visits.items():
        document = next(r for r in visit.requests if r.type == "Document")
        assert document.status == 200, (page, document)
        assert "Content-Security-Policy" in [h.title() for h in document.headers], document
        scripts = [r for r in visit.requests if r.type == "Script"]
        assert scripts and all(r.status == 200 and not r.failed for r in scripts), (page, scripts)
        # Everything else loads too (the browser's own /favicon.ico is the site's 404).
        others = [r for r in visit.requests if not r.url.endswith("/favicon.ico")]
        assert all(r.status in (200, 304) and not r.failed for r in others), (page, others)
        violations = [text for _, text in visit.console if "Content Security Policy" in text]
        assert not violations, (page, violations)
    assert "Add Flag" in title  # the last page, the admin's, rendered as the logged-in user
    assert inline_ran is False


def test_content_security_policy_report_only_by_environment_variable(prod, web):
    site = web(CSP_REPORT_ONLY="true")
    status, headers, _ = site.get("/")
    site.stop()

    assert status == 200 and "Content-Security-Policy" not in headers
    assert "default-src 'self'" in headers["Content-Security-Policy-Report-Only"]


# --- A database that cannot be connected to ----------------------------------------------------

BAD_DATABASES = {
    # (what is wrong, the URL's change, the server's reason in the line)
    "wrong password": (lambda url, port: url.replace("ci:ci@", "ci:s3cr3t-pw@"),
                       'FATAL: password authentication failed for user "ci"'),
    "unknown database": (lambda url, port: url.rsplit("/", 1)[0] + "/nosuchdb",
                         'FATAL: database "nosuchdb" does not exist'),
    "closed port": (lambda url, port: url.replace(f":{port}/", f":{services.free_port()}/"),
                    "Connection refused Is the server running on that host and accepting TCP/IP"),
    "no TLS on the server": (lambda url, port: url, "server does not support SSL, but SSL was required"),
}


@pytest.mark.parametrize("case", BAD_DATABASES)
def test_the_release_phase_says_once_why_the_database_cannot_be_reached(prod, postgres, case):
    project, base = prod
    change, reason = BAD_DATABASES[case]
    url = change(postgres.url, postgres.port)
    env = {**base, "DATABASE_URL": url, "DATABASE_SSL_REQUIRE": str(case == "no TLS on the server")}
    release = re.search(r"^release:\s*(.+)$", (project.path / "Procfile").read_text(), re.M).group(1)

    result = project.run(*shlex.split(release.replace("python", str(project.bin / "python"), 1)),
                         check=False, env=env)

    out = result.stdout + result.stderr
    assert result.returncode == 1
    name = url.rsplit("/", 1)[1]
    port = url.rsplit(":", 1)[1].split("/")[0]
    [line] = out.strip().splitlines()
    assert line.startswith(f"cannot connect to database {name} at 127.0.0.1:{port}: "), out
    assert reason in line and "s3cr3t-pw" not in out


def test_a_bucket_without_credentials_stops_the_start_with_one_line(prod, tmp_path):
    """AWS_STORAGE_BUCKET_NAME set, no keys and no IAM role: the release phase (and every other
    process) stops with one line naming the variable, instead of pages that all fail."""
    project, base = prod
    env = {**base, "AWS_STORAGE_BUCKET_NAME": "ci-bucket", "HOME": str(tmp_path),
           "AWS_EC2_METADATA_DISABLED": "true"}  # not on AWS: no instance role to ask for
    for command in [("check",), ("migrate", "--noinput")]:
        result = project.manage(*command, check=False, env=env)
        out = result.stdout + result.stderr
        assert result.returncode == 1, out
        [line] = out.strip().splitlines()
        assert line.startswith("AWS_ACCESS_KEY_ID is not set while AWS_STORAGE_BUCKET_NAME is"), out


def test_health_says_when_the_bucket_cannot_be_used(prod, web):
    closed = f"http://127.0.0.1:{services.free_low_port()}"
    site = web(AWS_STORAGE_BUCKET_NAME="ci-bucket", AWS_ACCESS_KEY_ID="AKIACI",
               AWS_SECRET_ACCESS_KEY="not-a-key", AWS_S3_ENDPOINT_URL=closed)
    status, body = site.health()
    out = site.stop()
    assert status == 503 and body["storage"] == "down" and body["database"] == "ok", (body, out[-2000:])
    assert "health check storage failed" in out and "not-a-key" not in out


def test_each_request_to_an_unreachable_database_logs_one_line_with_the_reason(prod, web):
    site = web(DATABASE_URL=prod[1]["DATABASE_URL"].replace("ci:ci@", "ci:s3cr3t-pw@"))

    statuses = [site.get("/celery/")[0] for _ in range(3)]

    out = site.stop()
    assert statuses == [500, 500, 500]
    errors = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 3, out
    for line in errors:
        assert line.startswith("ERROR django.request ") and "DatabaseUnreachable: cannot connect" in line
        assert 'password authentication failed for user \\"ci\\"' in line or "password authentication failed" in line
    assert "s3cr3t-pw" not in out and "WARNING psycopg.pool" not in out


def test_a_full_database_server_is_a_503_with_retry_after_then_heals(prod, web):
    """The server has no connection left (another process holds them all): a request waits at
    most DATABASE_POOL_TIMEOUT and gets a 503 with Retry-After, never a 500; once connections
    are free again, pages answer with no restart."""
    project, base = prod
    server = services.Postgres(services.free_low_port(), max_connections=6).start()
    holders = []
    try:
        url = server.url
        project.manage("migrate", "--noinput", env={**base, "DATABASE_URL": url})
        # Another client takes every connection the server allows.
        while True:
            probe = subprocess.run(
                ["psql", url.replace("postgres://", "postgresql://"), "-Atc", "select 1"],
                capture_output=True, text=True,
            )
            if "too many clients" in probe.stderr:
                break
            assert probe.returncode == 0, probe.stderr
            holders.append(subprocess.Popen(  # an idle session, until its input closes
                ["psql", url.replace("postgres://", "postgresql://")],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            time.sleep(0.2)
        site = web(DATABASE_URL=url, DATABASE_POOL_TIMEOUT="2")

        status, headers, page = site.get("/celery/")
        assert status == 503 and headers["Retry-After"] == "5", (status, page)

        for holder in holders:
            holder.stdin.close()
            holder.wait(10)
        time.sleep(5)  # what Retry-After asked
        status, _, page = site.get("/celery/")
        out = site.stop()
        assert status == 200, (page, out[-3000:])
        assert '" 500 ' not in out and "Traceback" not in out, out[-3000:]
    finally:
        for holder in holders:
            holder.kill()
        server.close()


class Visitors:
    """Visitors one after another on a few connections at once, each request with no retry: when
    each began and its status (0 if it got no answer)."""

    def __init__(self, site, path, count=4):
        self.site, self.path, self.answers = site, path, []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.visit, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def visit(self):
        while not self.stopping.is_set():
            began = time.monotonic()
            try:
                status = self.site.get(self.path)[0]
            except OSError:
                status = 0
            self.answers.append((began, status))

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)
        return self.answers


@pytest.mark.parametrize("outage", [1, 60])
def test_pages_answer_at_once_after_postgres_restarts(prod, web, outage):
    """Postgres goes away for a second or a minute, while one site is idle, another has one
    visitor during the outage and a third is under load: once it is back, every request is
    answered, none waiting for the pool's backoff (DATABASE_POOL_TIMEOUT=2 turns a wait of more
    than 2 s into a 503)."""
    project, base = prod
    server = services.Postgres(services.free_low_port()).start()
    try:
        project.manage("migrate", "--noinput", env={**base, "DATABASE_URL": server.url})
        sites = {name: web(DATABASE_URL=server.url, DATABASE_POOL_TIMEOUT="2")
                 for name in ("idle", "visited", "loaded")}
        for site in sites.values():
            assert site.get("/celery/")[0] == 200
        load = Visitors(sites["loaded"], "/celery/")
        server.stop()
        during = sites["visited"].get("/celery/")[0]
        time.sleep(outage)
        server.start()
        back = time.monotonic()
        # Until the visitors have had 8 answers to requests begun since (not a fixed time: a loaded
        # machine may still be answering the ones begun during the outage).
        deadline = back + 30
        while sum(began > back for began, _ in load.answers) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        answers = load.stop()
        after = {name: [site.get("/celery/")[0] for _ in range(5)] for name, site in sites.items()}
        out = "".join(site.stop() for site in sites.values())
        assert during in (500, 503), during
        assert after == {name: [200] * 5 for name in sites}, (after, out[-3000:])
        failed = [(round(began - back, 2), status) for began, status in answers if began > back and status != 200]
        assert not failed and any(began > back for began, _ in answers), (failed, out[-3000:])
        assert any(status != 200 for _, status in answers), "the load never met the outage"
    finally:
        server.close()


def cache_env(kind, redis, sasl_memcached, password=SASL_PASSWORD):
    if kind == "redis":
        return {"REDIS_URL": redis.url}
    return {
        "MEMCACHIER_SERVERS": sasl_memcached.servers,
        "MEMCACHIER_USERNAME": SASL_USER,
        "MEMCACHIER_PASSWORD": password,
    }


@pytest.mark.parametrize("outage", [0, 60])
@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_cache_sessions_and_pages_survive_the_cache_going_away(kind, outage, prod, web, redis, sasl_memcached):
    project, base = prod
    env = cache_env(kind, redis, sasl_memcached)
    server = {"redis": redis, "memcached": sasl_memcached}[kind]
    check = (
        "from django.core.cache import cache, caches; cache.set('svc-key', {'n': 42}); "
        "print(type(caches['default']).__name__, cache.get('svc-key'))"
    )
    result = project.manage("shell", "-c", check, env={**base, **env})
    backend = {"redis": "RedisCache", "memcached": "MemcachedCache"}[kind]
    assert result.stdout.splitlines()[-1] == f"{backend} {{'n': 42}}", result.stderr

    site = web(**env)
    site.login()
    assert site.logged_in()
    assert site.health() == (200, {"status": "ok", "database": "ok", "cache": "ok", "broker": "ok"})

    # Visitors all along: every page answers, cached or not.
    load = Visitors(site, "/")
    # A restart empties the cache (no persistence): sessions come back from the database.
    server.restart()
    assert site.logged_in()

    # The cache is down: pages still answer, the visitor is still logged in, /healthz says which.
    server.stop()
    try:
        status, _, page = site.get("/")
        assert status == 200 and f"Hello from {NAME}" in page
        assert site.logged_in()
        # Redis is Celery's broker too: down with it, up while memcached is the one down.
        broker = "down" if kind == "redis" else "ok"
        body = {"status": "down", "database": "ok", "cache": "down", "broker": broker}
        assert site.health() == (503, body)
        time.sleep(outage)  # a minute away, the visitors still on the site
    finally:
        server.start()
    # Back without a restart of the site (bmemcached waits up to 5 s before trying a server again).
    deadline = time.monotonic() + 20
    while site.health()[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert site.health()[0] == 200
    statuses = [status for _, status in load.stop()]
    out = site.stop()
    assert statuses and set(statuses) == {200}, (sorted(set(statuses)), out[-3000:])
    assert "failed, treated as a miss" in out
    assert "Traceback" not in out, out


def test_cache_on_redis_over_tls_with_a_self_signed_certificate(prod, tls_redis):
    project, base = prod
    check = (
        "from django.core.cache import cache; cache.set('svc-tls', 'over tls'); "
        "print(cache.get('svc-tls'))"
    )
    result = project.manage("shell", "-c", check, env={**base, "REDIS_URL": tls_redis.url})

    assert result.stdout.splitlines()[-1] == "over tls", result.stdout + result.stderr
    assert "treated as a miss" not in result.stdout


def test_memcached_refuses_a_wrong_sasl_password(prod, web, redis, sasl_memcached):
    site = web(**cache_env("memcached", redis, sasl_memcached, password="wrong"))

    body = {"status": "down", "database": "ok", "cache": "down", "broker": "ok"}
    assert site.health() == (503, body)
    assert site.get("/")[0] == 200  # the pages do not depend on the cache
    assert SASL_PASSWORD not in site.stop()


def test_a_view_error_reaches_sentry_and_the_log_with_release_and_request_id(prod, web, sentry):
    # A database that is down makes the Celery sample page fail (it lists rows).
    broken_db = f"postgres://ci:ci@127.0.0.1:{services.free_port()}/ci"
    site = web(
        SENTRY_DSN=sentry.dsn, SENTRY_ENVIRONMENT="staging", HEROKU_BUILD_COMMIT="0123abc",
        DATABASE_URL=broken_db,
    )

    status, _, page = site.get("/celery/", headers={"X-Request-ID": "0b6c1d2e-svc-test-request"})

    assert status == 500 and "OperationalError" not in page
    # The hello page still answers: a feature flag that cannot be read is off.
    status, _, page = site.get("/")
    assert status == 200 and f"Hello from {NAME}" in page
    event = sentry.wait_for_event()
    assert event["path"] == "/api/1/envelope/"
    assert event["exception"]["values"][-1]["type"] == "OperationalError"
    assert event["release"] == "0123abc" and event["environment"] == "staging"
    assert "user" not in event or "ip_address" not in event.get("user", {})
    out = site.stop()
    lines = [line for line in out.splitlines() if line.startswith("ERROR django.request ")]
    assert lines and lines[0].startswith("ERROR django.request request_id=0b6c1d2e-svc-test-request ")
    assert "OperationalError" in lines[0]  # the traceback is on the same line


def test_email_goes_out_through_a_celery_task_to_smtp(prod, redis, smtp, worker):
    project, base = prod
    env = {
        "REDIS_URL": redis.url,
        "MAILGUN_SMTP_SERVER": "127.0.0.1",
        "MAILGUN_SMTP_PORT": str(smtp.port),
        "EMAIL_USE_TLS": "false",  # aiosmtpd here speaks plain SMTP
        "DEFAULT_FROM_EMAIL": "site@example.com",
    }
    tasks = worker(**env)
    send = (
        "from django.core.mail import send_mail; "
        "print(send_mail('Hello from a task', 'Sent by the worker.', None, ['someone@example.com']))"
    )

    result = project.manage("shell", "-c", send, env={**base, **env})

    assert result.stdout.splitlines()[-1] == "1", result.stdout + result.stderr
    message = smtp.wait_for_message()
    assert message.mail_from == "site@example.com" and message.rcpt_tos == ["someone@example.com"]
    text = message.content.decode()
    assert "Subject: Hello from a task" in text and "Sent by the worker." in text
    out = tasks.stop()
    assert "core.tasks.send_email" in out and "succeeded" in out, out
    # The worker, too, says once which services are off.
    assert out.count("new relic: NEW_RELIC_LICENSE_KEY is not set") == 1, out


def test_a_task_error_reaches_sentry_and_the_log(prod, redis, sentry, worker):
    project, base = prod
    env = {
        "REDIS_URL": redis.url,
        "SENTRY_DSN": sentry.dsn,
        "SENTRY_ENVIRONMENT": "production",
        "HEROKU_BUILD_COMMIT": "7e8f9a0",
    }
    tasks = worker(**env)
    # A message the task cannot read: a real error inside a real task.
    enqueue = (
        f"from {NAME}.celery import app; "
        f"app.send_task('{NAME}.apps.core.tasks.send_email', args=[{{}}])"
    )

    project.manage("shell", "-c", enqueue, env={**base, **env})

    event = sentry.wait_for_event(timeout=60)
    assert event["exception"]["values"][-1]["type"] == "KeyError"
    assert event["release"] == "7e8f9a0" and event["environment"] == "production"
    out = tasks.stop()
    lines = [line for line in out.splitlines() if line.startswith("ERROR celery.app.trace ")]
    assert lines and "KeyError" in lines[0] and "send_email" in lines[0], out
