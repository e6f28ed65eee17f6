"""The owner's README, "Plain servers", run as written on this Debian machine, as root: its shell
blocks, taken from a rendered project's README.md, run in order in one bash, then the site is used
as a visitor and an operator would. Everything it starts is stopped at the end, pass or fail, and
nothing outside a temporary folder is changed.

The only changes to what the README says, each needed to run here beside other tests:
1. `<project>` is the project's name (the README asks the reader to replace it).
2. `/srv/` and `/etc/systemd/system/` are folders under a temporary root.
3. `apt-get` is not run: the packages are checked as installed (.ci/run installs them). Postgres
   and Redis start on free ports, as apt would start them on 5432 and 6379: `127.0.0.1:5432` and
   `127.0.0.1:6379` are those ports, and PGHOST/PGPORT send `runuser -u postgres -- psql` there.
4. systemd does not run here: `systemctl` is a shell function; `enable --now UNIT` starts the
   unit's ExecStart in the background with systemd's bare environment, `daemon-reload` and
   `disable --now nginx` (Debian's nginx service, not running here) do nothing.
5. In the project's etc/, nginx listens on free ports of 127.0.0.1 instead of 80, 443 and 8443, and
   gunicorn's socket is a free port instead of 127.0.0.1:8000.
6. The blocks run with root's stock PATH, HOME, LANG and UV_SYSTEM_CERTS=1 (uv trusts the OS's
   certificates, as bin/setup makes it do), nothing else from the test's environment.
Free ports are chosen at random below 32768.

The section's "Several servers: HAProxy in front" block (a plain ``` block, not ```sh) is for a
balancer, another machine: it installs Debian's haproxy service, which would take ports 80 and 443
here from the site's nginx. The last test runs what that service runs, haproxy with the project's
etc/haproxy.cfg, changed only as `haproxy_config` says (its ports, its server list).
"""

import contextlib
import http.client
import os
import random
import re
import resource
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import psutil
import pytest
import services
from conftest import NAME, readme_command, render

SUPERUSER_PASSWORD = "plain-admin-password-1"
SUM_SQUARES_1000 = sum(i * i for i in range(1, 1001))
PACKAGES = ["python3-venv", "postgresql", "redis-server", "nginx", "openssl"]


def section_blocks(readme):
    """The ```sh blocks of the README's "Plain servers" section, in order."""
    text = readme.read_text()
    start = text.index("\n## Plain servers")
    end = text.index("\n## ", start + 1)
    return re.findall(r"^```sh\n(.*?)^```$", text[start:end], re.M | re.S)


def free_port(taken=()):
    """A port below the temporary-port range (32768-60999) that nothing listens on."""
    while True:
        port = random.randrange(20000, 32768)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class Cluster:
    """A Postgres cluster as Debian's package makes it: superuser postgres, peer login on its
    socket, passwords over TCP; on a free port, in a temporary folder."""

    def __init__(self, folder, port):
        self.folder, self.port = folder, port
        self.data = folder / "data"

    def pg(self, *args):
        subprocess.run(services.as_service_user([services.require(args[0]), *args[1:]]),
                       check=True, capture_output=True)

    def start(self):
        self.folder.mkdir()
        shutil.chown(self.folder, "postgres")
        self.pg("initdb", "-D", str(self.data), "-U", "postgres",
                "--auth-local=peer", "--auth-host=scram-sha-256")
        self.pg("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.folder / "log"), "-o",
                f"-p {self.port} -k {self.folder} -h 127.0.0.1 -c fsync=off", "start")
        return self

    def stop(self):
        with contextlib.suppress(Exception):
            self.pg("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "stop")


class Site:
    """The server the README set up, as a visitor reaches it: https://SITE/ at 127.0.0.1."""

    def __init__(self, root):
        self.root = root
        self.project = root / "srv" / NAME
        self.ports = {}
        # What the README's SITE=$(hostname --fqdn) gives.
        self.name = subprocess.run(["hostname", "--fqdn"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",  # root's, stock
            "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            # This machine's own: uv trusts the OS's certificates (a proxy's CA), as bin/setup does.
            "UV_SYSTEM_CERTS": "1",
        }

    def bash(self, script, name):
        """Run README blocks, substituted, in a bash that stops at the first failing command."""
        path = self.root / f"{name}.sh"
        path.write_text(self.preamble() + substitute(script, self))
        return subprocess.run(["bash", str(path)], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=600)

    def preamble(self):
        units = self.root / "etc" / "systemd" / "system"
        return f"""set -e -o pipefail
export PGHOST={self.root}/pg PGPORT={self.ports['postgres']}
systemctl() {{
    case "$*" in
        daemon-reload|"disable --now nginx") ;;
        "enable --now "*)
            setsid env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
                $(sed -n 's/^ExecStart=//p' "{units}/$3.service") \\
                > {self.root}/systemd-$3.log 2>&1 < /dev/null &
            echo $! > {self.root}/systemd-$3.pid ;;
        *) echo "systemctl $*: not in this test's stand-in" >&2; return 1 ;;
    esac
}}
"""

    def supervisorctl(self, *args):
        return subprocess.run(
            [str(self.project / ".venv/bin/supervisorctl"), "-c", "etc/supervisord.conf", *args],
            cwd=self.project, capture_output=True, text=True, timeout=180)

    def status(self):
        out = self.supervisorctl("status").stdout
        return dict(re.findall(r"^(\S+)\s+([A-Z]+)", out, re.M)), out

    def running(self, timeout=60):
        """status() once every program is RUNNING: supervisord says STARTING for a program's
        first 10 s (startsecs), which a loaded machine can stretch past the first page."""
        deadline = time.monotonic() + timeout
        while True:
            states, out = self.status()
            if states and all(state == "RUNNING" for state in states.values()):
                return states, out
            assert time.monotonic() < deadline, f"not all RUNNING after {timeout} s:\n{out}"
            assert "FATAL" not in states.values() and "EXITED" not in states.values(), out
            time.sleep(1)

    def connection(self, port=None, timeout=30, source=None):
        context = ssl.create_default_context(cafile=self.project / "var/tls/cert.pem")
        return _Connection(self.name, port or self.ports["https"], context, timeout, source)

    def request(self, method, path, body=None, headers=None, timeout=30):
        """One request on a new connection: (status, headers, body)."""
        return self.request_at(None, method, path, body, headers, timeout)

    def request_at(self, port, method, path, body=None, headers=None, timeout=30):
        """One request on a new connection to `port` (None: nginx's): (status, headers, body)."""
        conn = self.connection(port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def origin(self):
        return f"https://{self.name}:{self.ports['https']}"

    def processes(self):
        """This site's processes: supervisord and its programs work in the project's folder."""
        found = []
        for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
            if (proc.info["cwd"] or "").startswith(str(self.project)):
                found.append(proc)
        return found


class _Connection(http.client.HTTPSConnection):
    """To the site by its name (SNI, the certificate's name, Host) at 127.0.0.1, as a browser
    whose DNS gives the loopback address."""

    def __init__(self, name, port, context, timeout, source=None):
        super().__init__(name, port, timeout=timeout, context=context)
        self.tls, self.source = context, source

    def connect(self):
        source = (self.source, 0) if self.source else None
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout, source)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def substitute(script, site):
    """The substitutions listed in the module's docstring, and only those."""
    script = script.replace("<project>", NAME)
    script = script.replace("/srv/", f"{site.root}/srv/")
    script = script.replace("/etc/systemd/system/", f"{site.root}/etc/systemd/system/")
    script = script.replace("127.0.0.1:5432", f"127.0.0.1:{site.ports['postgres']}")
    script = script.replace("127.0.0.1:6379", f"127.0.0.1:{site.ports['redis']}")
    lines = []
    for line in script.splitlines():
        if line.startswith("apt-get update"):
            line = "true  # apt-get update: not run here"
        elif line.startswith("apt-get install"):
            packages = [w for w in line.split()[2:] if not w.startswith("-")]
            assert packages == PACKAGES, f"the README installs {packages}: update PACKAGES"
            line = "dpkg -s " + " ".join(packages) + " > /dev/null  # installed by .ci/run"
        lines.append(line)
    return "\n".join(lines) + "\n"


def listen_on_test_ports(project, ports):
    """Substitution 5: nginx's and gunicorn's ports in the project's etc/."""
    nginx = project / "etc/nginx.conf"
    text = nginx.read_text()
    text = re.sub(r"^\s*listen \[::\]:.*\n", "", text, flags=re.M)
    for public, port in (("80", ports["http"]), ("443", ports["https"]),
                         ("8443", ports["proxied"])):
        text, count = re.subn(rf"listen {public}\b", f"listen 127.0.0.1:{port}", text)
        assert count == 1, f"etc/nginx.conf: no single `listen {public}`"
    for path in (nginx, project / "etc/conf.d/web.conf"):
        if path != nginx:
            text = path.read_text()
        assert "127.0.0.1:8000" in text, f"{path.name}: gunicorn is not on 127.0.0.1:8000"
        path.write_text(text.replace("127.0.0.1:8000", f"127.0.0.1:{ports['gunicorn']}"))


@pytest.fixture(scope="module")
def site():
    root = Path(tempfile.mkdtemp(prefix="plain-"))
    root.chmod(0o755)  # as /srv: nginx's workers (www-data) read the static files under it
    site = Site(root)
    for name in ("postgres", "redis", "http", "https", "proxied", "gunicorn"):
        site.ports[name] = free_port(set(site.ports.values()))
    redis = services.redis(site.ports["redis"])
    cluster = Cluster(root / "pg", site.ports["postgres"])
    try:
        (root / "srv").mkdir()
        (root / "etc" / "systemd" / "system").mkdir(parents=True)  # as on any systemd machine
        render(root / "srv", readme_command())
        listen_on_test_ports(site.project, site.ports)
        cluster.start()
        redis.start()
        site.blocks = section_blocks(site.project / "README.md")
        assert len(site.blocks) == 5, "the README's Plain servers section changed: update this test"
        *install, site.deploy = site.blocks
        assert "restart web:web_0" in site.deploy
        done = site.bash("\n".join(install), "install")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        wait_for_page(site, 90)
        yield site
    finally:
        stop_everything(site)
        redis.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_for_page(site, timeout, path="/"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if site.request("GET", path, timeout=10)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            log = "".join(p.read_text()[-1500:] for p in sorted((site.project / "var").glob("*.log")))
            raise AssertionError(f"no 200 from {path} within {timeout} s\n{log}")
        time.sleep(0.5)


def stop_everything(site):
    """supervisord's own shutdown (each program stopped as it says), then anything left over."""
    if (site.project / ".venv/bin/supervisorctl").exists() and (site.project / "var").exists():
        with contextlib.suppress(Exception):
            site.supervisorctl("shutdown")
    deadline = time.monotonic() + 40
    while site.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    for proc in site.processes():
        with contextlib.suppress(psutil.Error):
            proc.kill()


def form_token(body):
    return re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1).decode()


def cookies(headers):
    return "; ".join(v.split(";", 1)[0] for k, v in headers.items() if k.lower() == "set-cookie")


def post_form(site, path, fields):
    """A form as a browser submits it: its page first (the CSRF cookie and token), then POST."""
    status, headers, body = site.request("GET", path)
    assert status == 200, body[:500]
    jar = cookies(headers)
    form = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": form_token(body)})
    status, headers, body = site.request("POST", path, form, {
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": jar,
        "Origin": site.origin(), "Referer": site.origin() + path,
    })
    return status, headers, body, jar


def test_hello_page_and_static_files_over_nginx_with_tls(site):
    status, headers, body = site.request("GET", "/")
    assert status == 200 and NAME.encode() in body
    urls = set(re.findall(r'(?:href|src)="(/static/[^"]+)"', body.decode()))
    assert urls, "the hello page links no static file"
    for url in sorted(urls):
        status, headers, content = site.request("GET", url)
        assert status == 200 and content, url
        assert "max-age=31536000" in headers["Cache-Control"], url
    # nginx, not gunicorn, served them.
    web_logs = "".join(p.read_text() for p in (site.project / "var").glob("web_*.log"))
    assert '"GET / HTTP' in web_logs
    assert not [url for url in urls if url in web_logs]
    # Plain HTTP is sent to HTTPS.
    conn = http.client.HTTPConnection("127.0.0.1", site.ports["http"], timeout=10)
    conn.request("GET", "/", headers={"Host": site.name})
    response = conn.getresponse()
    assert response.status == 301 and response.headers["Location"].startswith("https://")
    conn.close()


def test_admin_login(site):
    made = subprocess.run(
        ["sh", "-c", "set -a && . ./.env && exec .venv/bin/python manage.py createsuperuser"
         " --noinput --username admin --email admin@example.com"],
        cwd=site.project, capture_output=True, text=True,
        env={**site.env, "DJANGO_SUPERUSER_PASSWORD": SUPERUSER_PASSWORD},
    )
    assert made.returncode == 0, made.stderr
    status, headers, body, jar = post_form(site, "/admin/login/?next=/admin/", {
        "username": "admin", "password": SUPERUSER_PASSWORD, "next": "/admin/"})
    assert status == 302, body[:1000]
    session = "; ".join(filter(None, [jar, cookies(headers)]))
    status, _, body = site.request("GET", "/admin/", headers={"Cookie": session})
    assert status == 200 and b"Site administration" in body


def test_the_worker_runs_a_task_from_the_sample_page(site):
    status, headers, body, _ = post_form(site, "/celery/", {"n": "1000", "seconds": "0"})
    assert status == 302, body[:1000]
    detail = headers["Location"]
    deadline = time.monotonic() + 60
    while True:
        status, _, body = site.request("GET", detail)
        assert status == 200
        if b'id="state">SUCCESS' in body:
            break
        assert time.monotonic() < deadline, f"the task did not finish: {body[-800:]}"
        time.sleep(0.5)
    assert f'id="result">{SUM_SQUARES_1000}<'.encode() in body


def test_exactly_one_scheduler(site):
    states, out = site.running()
    assert [name for name in states if name.startswith("scheduler")] == ["scheduler"], out
    assert all(state == "RUNNING" for state in states.values()), out
    assert set(states) == {"nginx", "web:web_0", "web:web_1", "worker", "scheduler"}, out
    beats = [p for p in site.processes() if "beat" in (p.info["cmdline"] or [])]
    assert len(beats) == 1, [p.info["cmdline"] for p in beats]


def test_deploy_rereads_env_and_restarts_with_no_502(site):
    """The README's deploy block, after an edit of .env, while a visitor keeps loading the page."""
    assert "Strict-Transport-Security" not in site.request("GET", "/")[1]
    pids = site.running()[1]
    env_file = site.project / ".env"
    env_file.write_text(env_file.read_text().replace("SECURE_HSTS_SECONDS=0", "SECURE_HSTS_SECONDS=120"))

    answers, stop = [], threading.Event()

    def visitor():
        while not stop.is_set():
            try:
                answers.append(site.request("GET", "/", timeout=30)[0])
            except OSError as error:
                answers.append(repr(error))

    threads = [threading.Thread(target=visitor) for _ in range(2)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        deploy = site.bash(site.deploy, "deploy")
        print(f"the deploy block took {time.monotonic() - started:.1f} s")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]

    states, after = site.running()
    for program in ("web:web_0", "web:web_1", "worker", "scheduler"):
        before_pid = re.search(rf"^{program}\s+RUNNING\s+pid (\d+)", pids, re.M).group(1)
        after_pid = re.search(rf"^{program}\s+RUNNING\s+pid (\d+)", after, re.M).group(1)
        assert before_pid != after_pid, f"{program} was not restarted"
    others = [a for a in answers if a != 200]
    print(f"{len(answers)} requests during the deploy, {len(others)} not 200")
    assert len(answers) > 20 and not others, others[:10]
    assert site.request("GET", "/")[1]["Strict-Transport-Security"].startswith("max-age=120")


def test_thousand_slow_clients_do_not_stop_the_site(site):
    """500 connections that never start TLS, 500 that send their headers a byte a second: all
    open at once, on loopback, for a few seconds (less than nginx's 10 s for a request's headers):
    the hello page still answers, and nginx still holds them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    idle, slow = [], []
    try:
        for _ in range(500):
            idle.append(socket.create_connection(("127.0.0.1", site.ports["https"]), 10))
            sock = socket.create_connection(("127.0.0.1", site.ports["http"]), 10)
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {site.name}\r\n".encode())
            slow.append(sock)
        answers = []
        for _ in range(3):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"X")
            answers.append(site.request("GET", "/", timeout=10)[0])
            time.sleep(1)
        # Still held by nginx (not yet timed out): the site answered while they were open.
        assert sum(1 for sock in idle if _open(sock)) > 400
    finally:
        for sock in idle + slow:
            sock.close()
    assert answers == [200] * 3


def _open(sock):
    """True while the server has not closed the connection."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_prod_settings_with_sqlite_need_no_ssl_setting(site):
    """DATABASE_SSL_REQUIRE defaults to true; with SQLite it has nothing to require."""
    env = {**site.env, "DJANGO_SETTINGS_MODULE": f"{NAME}.settings.prod",
           "SECRET_KEY": "x" * 20 + "abcdefghijklmnopqrstuvwxyz0123456789",
           "DATABASE_URL": f"sqlite:///{site.root}/lite.sqlite3", "ALLOWED_HOSTS": "example.com",
           "REDIS_URL": f"redis://127.0.0.1:{site.ports['redis']}/0"}
    migrate = subprocess.run([".venv/bin/python", "manage.py", "migrate", "--noinput"],
                             cwd=site.project, env=env, capture_output=True, text=True)
    assert migrate.returncode == 0 and "Traceback" not in migrate.stderr, migrate.stderr[-2000:]


def test_a_worker_that_cannot_start_is_fatal_not_running(site):
    """No broker in .env: the worker stops at once, and supervisord says FATAL after 3 tries."""
    env_file = site.project / ".env"
    good = env_file.read_text()
    env_file.write_text(re.sub(r"^REDIS_URL=.*\n", "", good, flags=re.M))
    try:
        site.supervisorctl("restart", "worker")
        # Each failed start is followed by a longer wait (1, 2, 3 s), then FATAL.
        deadline = time.monotonic() + 90
        while (states := site.status())[0]["worker"] in ("STARTING", "BACKOFF"):
            assert time.monotonic() < deadline, states[1]
            time.sleep(1)
        assert states[0]["worker"] == "FATAL", states[1]
        assert "REDIS_URL" in (site.project / "var/worker.log").read_text()
    finally:
        env_file.write_text(good)
        site.supervisorctl("start", "worker")
    assert site.status()[0]["worker"] == "RUNNING"


VISITOR = "127.0.0.2"  # a loopback address too, not the 127.0.0.1 HAProxy connects from


def haproxy_config(site, ports):
    """The project's etc/haproxy.cfg, changed only to run beside the site on this one machine:
    its listen ports are free ports of 127.0.0.1, and its server list is one server, the site's
    nginx on its test port (README: "Several servers", where it runs on a machine of its own)."""
    text = (site.project / "etc/haproxy.cfg").read_text()
    for public, port in (("80", ports["http"]), ("443", ports["https"])):
        text, count = re.subn(rf"^(\s*bind ):{public}$", rf"\g<1>127.0.0.1:{port}", text,
                              flags=re.M)
        assert count == 1, f"etc/haproxy.cfg: no single `bind :{public}`"
    servers = re.findall(r"^\s*server \S+ \S+$", text, re.M)
    assert servers, "etc/haproxy.cfg: no `server NAME ADDRESS` line"
    for line in servers[1:]:
        text = text.replace(line + "\n", "")
    name = servers[0].split()[1]
    one = re.sub(r"\S+$", f"127.0.0.1:{site.ports['proxied']}", servers[0])
    return text.replace(servers[0], one), name


def wait_for_text(path, start, text, timeout):
    """Wait until `text` is in the file `path` past its first `start` characters."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text()[start:]:
        tail = path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not in {path.name}: {text}\n{tail}"
        time.sleep(0.5)


def test_haproxy_in_front_sends_visitors_to_a_healthy_server_only(site):
    """HAProxy with the project's etc/haproxy.cfg, in front of the site's nginx, SITE in its
    environment as the README's /etc/default/haproxy gives it: its health check gets 200 from
    /healthz (a Host the site accepts); the hello page answers through it, TLS passed through, and
    nginx has the visitor's address (the PROXY protocol), not HAProxy's; with
    the site's web processes stopped the check fails and HAProxy takes the server out, and once
    they are started again it brings the server back by itself."""
    ports = {}
    for name in ("http", "https"):
        ports[name] = free_port({*site.ports.values(), *ports.values()})
    config, server = haproxy_config(site, ports)
    cfg, log = site.root / "haproxy.cfg", site.root / "haproxy.log"
    cfg.write_text(config)
    nginx_log = site.project / "var/nginx.log"
    seen = len(nginx_log.read_text())
    with open(log, "w") as out:
        haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
            env={"PATH": site.env["PATH"], "SITE": site.name})
    try:
        # The check reached Django through nginx and got 200: the Host was accepted.
        wait_for_text(nginx_log, seen, '"GET /healthz HTTP/1.1" 200', 30)
        # A visitor from another address than HAProxy's (127.0.0.1).
        conn = site.connection(port=ports["https"], source=VISITOR)
        try:
            conn.request("GET", "/?through-haproxy")
            response = conn.getresponse()
            assert response.status == 200 and NAME.encode() in response.read()
            # Passed through: the certificate is the app server's own.
            assert conn.sock.getpeercert()["subject"] == ((("commonName", site.name),),)
        finally:
            conn.close()
        # nginx (and so X-Forwarded-For, the login throttle) has the visitor's address.
        wait_for_text(nginx_log, seen, '"GET /?through-haproxy HTTP/1.1" 200', 10)
        lines = nginx_log.read_text()[seen:].splitlines()
        assert [line for line in lines if "GET /?through-haproxy " in line
                and line.startswith(f"{VISITOR} ")], lines[-5:]
        plain = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=10)
        plain.request("GET", "/", headers={"Host": site.name})
        response = plain.getresponse()
        assert response.status == 301
        assert response.headers["Location"] == f"https://{site.name}/"
        plain.close()

        stopped = site.supervisorctl("stop", "web:*")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        try:
            wait_for_text(log, 0, f"Server app/{server} is DOWN", 60)
            # No server left: HAProxy closes the connection rather than pass it on.
            with pytest.raises(OSError):
                site.request_at(ports["https"], "GET", "/")
        finally:
            started = site.supervisorctl("start", "web:*")
        assert started.returncode == 0, started.stdout + started.stderr
        wait_for_text(log, 0, f"Server app/{server} is UP", 60)
        assert site.request_at(ports["https"], "GET", "/")[0] == 200
    finally:
        haproxy.terminate()
        try:
            haproxy.wait(20)
        except subprocess.TimeoutExpired:
            haproxy.kill()
            haproxy.wait()
