"""A throwaway RabbitMQ node on loopback (Debian's rabbitmq-server, installed by .ci/run): its own
folder, node name, AMQP and distribution ports, and its own epmd, so it touches no system service."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from services import free_low_port, require, stop_group, wait_for_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the real script; /usr/sbin's wraps it with su
EPMD = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"


class RabbitMQ:
    def __init__(self):
        # Below the temporary ports: a test may stop the node and start it again on the same ones.
        self.port, self.dist_port, self.epmd_port = free_low_port(), free_low_port(), free_low_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ci-rabbitmq-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"  # guest may log in on loopback
        self.proc = None

    def env(self):
        d = self.dir
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(d),  # the Erlang cookie lives here
            "RABBITMQ_NODENAME": f"ci{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
        }

    def start(self):
        if not Path(SERVER).exists():
            require("rabbitmq-server")  # says how to install it
        (self.dir / "enabled_plugins").write_text("[].\n")
        user = []
        if os.geteuid() == 0:  # RabbitMQ runs as its own user, which Debian's package makes
            for path in (self.dir, self.dir / "enabled_plugins"):
                shutil.chown(path, "rabbitmq")
            user = ["runuser", "-u", "rabbitmq", "--"]
        self.log = open(self.dir / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*user, "env", "-i", *(f"{k}={v}" for k, v in self.env().items()), SERVER],
            cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_for_port(self.port, timeout=90)
        except TimeoutError:
            self.close()
            raise
        # The port opens before the broker accepts logins: wait for its startup to complete.
        deadline = time.monotonic() + 30
        while "started" not in (self.dir / "server.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self

    def stop(self):
        """Stop the node, keeping its folder (its queues and their messages) for start(). SIGTERM,
        and time for its clean shutdown: a SIGKILL can lose a persistent message not yet on disk."""
        if self.proc:
            stop_group(self.proc, timeout=90)
            self.log.close()
            self.proc = None

    def close(self):
        self.stop()
        # The node started an epmd of its own (on its own port), which outlives it: end it.
        subprocess.run(
            [EPMD, "-port", str(self.epmd_port), "-kill"], capture_output=True, check=False, timeout=10,
            env={**os.environ, "ERL_EPMD_ADDRESS": "127.0.0.1"},
        )
        shutil.rmtree(self.dir, ignore_errors=True)
