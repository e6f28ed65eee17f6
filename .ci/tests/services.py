"""Real servers on loopback for the template's tests: each starts in a temporary folder on its own
port and stops when its context ends. Debian's packages, installed by .ci/run."""

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = next(Path("/usr/lib/postgresql").glob("*/bin"), Path("/usr/lib/postgresql/15/bin"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_low_port():
    """A free port below Linux's temporary range (32768-60999), picked at random: for servers a
    fault test stops and starts again on the same port, which a loaded machine could otherwise
    hand to one of its own outgoing connections while the server is down."""
    for _ in range(200):
        port = random.randrange(10000, 32768)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free port between 10000 and 32767")


def wait_for_port(port, timeout=30, host="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def stop_group(proc, timeout=20):
    """SIGTERM a process's whole group (it was started with start_new_session=True); SIGKILL it
    if it is still there after `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def require(program):
    path = shutil.which(program) or (PG_BIN / program if (PG_BIN / program).exists() else None)
    if not path:
        raise RuntimeError(f"{program} is not installed: run .ci/run once, or apt-get install it")
    return str(path)


def as_service_user(args):
    """Servers that refuse to run as root run as the postgres user (Debian's package makes it)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class Postgres:
    """A throwaway PostgreSQL cluster; .url is a DATABASE_URL for it."""

    def __init__(self, port=None, max_connections=200):
        self.port = port or free_low_port()
        self.max_connections = max_connections
        self.dir = Path(tempfile.mkdtemp(prefix="ci-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgres://ci:ci@127.0.0.1:{self.port}/ci"

    def _pg(self, *args, **kw):
        return subprocess.run(as_service_user([require(args[0]), *args[1:]]), check=True, capture_output=True, **kw)

    def start(self):
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        if not self.data.exists():
            pwfile = self.dir / "pw"
            pwfile.write_text("ci\n")
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres")
            self._pg("initdb", "-D", str(self.data), "-U", "ci", "--pwfile", str(pwfile), "-A", "scram-sha-256")
        self._pg(
            "pg_ctl", "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
            "-o", f"-p {self.port} -k {self.dir} -h 127.0.0.1 -c max_connections={self.max_connections} -c fsync=off",
            "start",
        )
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "ci", "ci", env={**os.environ, "PGPASSWORD": "ci"})
        return self

    def stop(self, mode="fast"):
        self._pg("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def restart(self):
        self.stop()
        self.start()

    def sql(self, query):
        """Run one query with psql and return its rows as text."""
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "ci", "-d", "ci", "-Atc", query],
            env={**os.environ, "PGPASSWORD": "ci"}, check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def close(self):
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class Process:
    """A server run in the foreground as a child process."""

    def __init__(self, args, port, **popen):
        self.args, self.port, self.popen = args, port, popen
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, **self.popen)
        wait_for_port(self.port)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self):
        self.stop()
        self.start()

    close = stop


def redis(port=None):
    port = port or free_low_port()
    server = Process([require("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], port)
    server.url = f"redis://127.0.0.1:{port}/0"
    return server


def memcached(port=None):
    port = port or free_low_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    server = Process([require("memcached"), "-l", "127.0.0.1", "-p", str(port), *user], port)
    server.servers = f"127.0.0.1:{port}"
    return server
