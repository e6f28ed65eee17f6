"""No secret leaves the new project's processes: a marker in every secret variable, every way a
report leaves (the log, error mail printed to stdout or sent by SMTP, Sentry's envelopes, the
error page, the process list), and each searched for the markers. Real Postgres (a role whose
password is a marker), Redis requiring a marker password, aiosmtpd, and a Sentry endpoint on
loopback; the Procfile's web and worker lines."""

import json
import secrets

import psutil
import pytest
from conftest import services
from test_services import Process, SentryEndpoint, Web, prod, smtp  # noqa: F401 (fixtures)

MARK = f"mk{secrets.token_hex(4)}"


class Sentry(SentryEndpoint):
    """Keeps each envelope whole too."""

    def __init__(self):
        self.envelopes = []
        super().__init__()
        # The DSN's key is what sentry-sdk authenticates with: it goes to Sentry, and only there.
        self.dsn = self.dsn.replace("publickey", f"{MARK}sentrykey")

    def receive(self, path, body):
        self.envelopes.append(body.decode())
        super().receive(path, body)

    def payloads(self):
        """Everything sent but each envelope's header (which names the DSN's key)."""
        return ["\n".join(envelope.split("\n")[1:]) for envelope in self.envelopes]


@pytest.fixture
def sentry():
    endpoint = Sentry()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def marked(prod, postgres):
    """The production environment with a marker in every secret, and servers that take them."""
    project, base = prod
    password = f"{MARK}-db-pw"
    postgres.sql(f"CREATE ROLE leak LOGIN SUPERUSER PASSWORD '{password}'")
    redis_port = services.free_port()
    redis = services.Process(
        [services.require("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--requirepass", f"{MARK}-redis-pw"], redis_port,
    ).start()
    env = {
        **base,
        "SECRET_KEY": f"{MARK}{secrets.token_urlsafe(50)}",
        "DATABASE_URL": f"postgres://leak:{password}@127.0.0.1:{postgres.port}/ci",
        "REDIS_URL": f"redis://:{MARK}-redis-pw@127.0.0.1:{redis_port}/0",
        "MEMCACHIER_PASSWORD": f"{MARK}-memcachier-pw",
        "MAILGUN_SMTP_PASSWORD": f"{MARK}-mailgun-pw",
        "AWS_SECRET_ACCESS_KEY": f"{MARK}-aws-secret",
        "NEW_RELIC_LICENSE_KEY_UNUSED": f"{MARK}-new-relic-key",
        # Ones the project does not read, as an add-on or the owner may add.
        "PAYMENTS_API_TOKEN": f"{MARK}-payments-token",
        "PARTNER_URL": f"https://partner:{MARK}-partner-pw@partner.example.com/v1",
        "ADMINS": "ops@example.com",
    }
    yield project, env
    redis.stop()


def broken_database(env):
    """The same credentials, to a database that is down: /celery/ fails with the connection's
    parameters, password included, in its traceback's local variables."""
    return env["DATABASE_URL"].rsplit(":", 1)[0] + f":{services.free_port()}/ci"


def command_lines(process):
    root = psutil.Process(process.proc.pid)
    return [" ".join(p.cmdline()) for p in [root, *root.children(recursive=True)]]


def assert_no_marker(*texts):
    for text in texts:
        at = text.find(MARK)
        assert at < 0, f"a secret leaked: ...{text[max(0, at - 300):at + 80]}..."


def test_no_secret_in_the_log_the_printed_error_mail_sentry_or_ps(marked, sentry):
    project, env = marked
    site = Web(project, {**env, "DATABASE_URL": broken_database(env), "SENTRY_DSN": sentry.dsn})

    status, _, page = site.get("/celery/", headers={"X-Request-ID": "leak-probe-500-request"})
    not_found, _, _ = site.get("/no-such-page")
    foreign, _, _ = site.get("/", headers={"Host": "evil.example"})
    sentry.wait_for_event()
    processes = command_lines(site)
    out = site.stop()

    assert status == 500 and "<h1>Server error</h1>" in page
    assert not_found == 404 and foreign == 400
    # The error mail, printed without a mail add-on, with Django's settings and the traceback.
    assert "Subject: [Django] ERROR (EXTERNAL IP): Internal Server Error: /celery/" in out
    assert "REDIS_URL =3D 'redis://:********************@127.0.0.1:" in out
    assert "OperationalError" in out and "ERROR django.request request_id=leak-probe-500-request" in out
    # The Host header forged: one short line, no traceback, no second mail.
    foreign_lines = [line for line in out.splitlines() if "evil.example" in line]
    assert len(foreign_lines) == 1 and "Traceback" not in foreign_lines[0], foreign_lines
    assert foreign_lines[0].startswith("WARNING django.security.DisallowedHost request_id=")
    assert out.count("Subject: [Django]") == 1
    [lost] = [line for line in out.splitlines() if "Not Found: /no-such-page" in line]
    assert "request_id=- " not in lost
    assert_no_marker(out, page, *processes, *sentry.payloads())


def test_no_secret_in_error_mail_sent_by_smtp(marked, smtp):
    project, env = marked
    mail = {
        "MAILGUN_SMTP_SERVER": "127.0.0.1",
        "MAILGUN_SMTP_PORT": str(smtp.port),
        "EMAIL_USE_TLS": "false",  # aiosmtpd here speaks plain SMTP
    }
    worker = Process(project, {**env, **mail}, "worker")
    worker.wait_for("ready.", timeout=90)
    site = Web(project, {**env, **mail, "DATABASE_URL": broken_database(env)})
    try:
        status, _, _ = site.get("/celery/")
        message = smtp.wait_for_message()
        processes = command_lines(site) + command_lines(worker)
    finally:
        out = site.stop() + worker.stop()

    assert status == 500
    text = message.content.decode()
    assert message.rcpt_tos == ["ops@example.com"] and "Internal Server Error: /celery/" in text
    assert "OperationalError" in text and "CELERY_BROKER_URL" in text
    assert_no_marker(text, out, *processes, json.dumps(message.mail_from))
