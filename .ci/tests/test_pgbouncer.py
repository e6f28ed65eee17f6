"""More web processes than the database has connections: a new project behind a real PgBouncer
(Debian's, 1.18) in transaction mode, as Heroku's connection pooling runs it
(DATABASE_CONNECTION_POOL_URL), with a server pool of 4 handed out round robin, so that no test
passes only because a client got the same server connection back.

4 web processes (the Procfile's line, prod settings, WEB_CONCURRENCY=2 each) would hold up to
4 x 2 x 7 = 56 connections; the database allows 20. The release phase migrates on the direct
DATABASE_URL, while PgBouncer is not even running.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))

import stack  # noqa: E402
from conftest import NAME, services  # noqa: E402

MAX_CONNECTIONS = 20  # Heroku Postgres essential-0's limit
SERVER_POOL = 4
WEB_PROCESSES, WEB_CONCURRENCY, POOL_SIZE = 4, 2, 7
ROWS = 2000

# Pages that do through PgBouncer what transaction pooling breaks when it is not set up for it.
VIEWS = '''\
from django.contrib.auth.models import Group
from django.db import connection, transaction
from django.http import JsonResponse
from django.urls import path


def iterate(request):
    # A server-side cursor (DECLARE, then FETCH) would outlive its transaction.
    names = [g.name for g in Group.objects.order_by("id").iterator(chunk_size=100)]
    return JsonResponse({"rows": len(names), "last": names[-1] if names else None})


def repeat(request):
    # psycopg prepares a query run more than prepare_threshold times on one connection.
    counts = [Group.objects.filter(name__startswith="g-1").count() for _ in range(12)]
    return JsonResponse({"counts": counts, "backend": connection.connection.info.backend_pid})


def lock(request):
    with transaction.atomic():
        group = Group.objects.select_for_update().get(name="g-0")
        group.name = "g-0"
        group.save(update_fields=["name"])
    return JsonResponse({"locked": group.pk})


urlpatterns = [path("pgb/iterate/", iterate), path("pgb/repeat/", repeat), path("pgb/lock/", lock)]
'''


class PgBouncer:
    """PgBouncer in the foreground, as the postgres user (it refuses to run as root), in
    transaction mode in front of `postgres`."""

    def __init__(self, postgres, port):
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="ci-pgbouncer-"))
        (self.dir / "userlist.txt").write_text('"ci" "ci"\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"""[databases]
ci = host=127.0.0.1 port={postgres.port} dbname=ci

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.dir / "userlist.txt"}
pool_mode = transaction
default_pool_size = {SERVER_POOL}
; all of them open from the start, so that round robin always has several to choose from
min_pool_size = {SERVER_POOL}
max_client_conn = 1000
server_round_robin = 1
; after a failed connection to the server, try again in 1 s, not 15
server_login_retry = 1
logfile = {self.dir / "pgbouncer.log"}
"""
        )
        if os.geteuid() == 0:
            for path in [self.dir, *self.dir.iterdir()]:
                shutil.chown(path, "postgres")
        self.url = f"postgres://ci:ci@127.0.0.1:{port}/ci"
        self.proc = None

    def start(self):
        args = services.as_service_user([services.require("pgbouncer"), str(self.dir / "pgbouncer.ini")])
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        services.wait_for_port(self.port)
        return self

    def log(self):
        path = self.dir / "pgbouncer.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def close(self):
        if self.proc and self.proc.poll() is None:
            services.stop_group(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def database():
    server = services.Postgres(port=services.free_low_port(), max_connections=MAX_CONNECTIONS)
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(scope="module")
def pgbouncer(database):
    # Made, not started: the release phase runs without it.
    bouncer = PgBouncer(database, services.free_low_port())
    yield bouncer
    bouncer.close()


@pytest.fixture(scope="module")
def config(database, pgbouncer, redis):
    return stack.config_vars(
        database,
        redis,
        WEB_CONCURRENCY=str(WEB_CONCURRENCY),
        # An owner's settings that would prepare every query run twice (server-side binding and a
        # prepare_threshold of 1): the transaction-pooling settings override them.
        DATABASE_CONNECTION_POOL_URL=pgbouncer.url + "?server_side_binding=true&prepare_threshold=1",
    )


@pytest.fixture(scope="module")
def released(tmp_path_factory, config, pgbouncer, database):
    build = stack.Build(tmp_path_factory.mktemp("pgbouncer"))
    app = build.path / NAME / "apps" / "pgb"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "urls.py").write_text(VIEWS)
    with open(build.path / NAME / "urls.py", "a") as urls:
        urls.write(f'\nurlpatterns += [path("", include("{NAME}.apps.pgb.urls"))]\n')

    collect = build.run("python manage.py collectstatic --noinput", config)
    assert collect.returncode == 0, collect.stdout + collect.stderr
    # The Procfile's release line while PgBouncer is down: migrate uses the direct DATABASE_URL.
    release = build.run(build.processes["release"], config)
    assert release.returncode == 0, release.stdout + release.stderr
    values = ",".join(f"('g-{i}')" for i in range(ROWS))
    database.sql(f"INSERT INTO auth_group (name) VALUES {values}")
    pgbouncer.start()
    return build


@pytest.fixture(scope="module")
def webs(released, config, database):
    """WEB_PROCESSES web dynos: the Procfile's web line under honcho, one port each."""
    started = []
    try:
        for i in range(WEB_PROCESSES):
            honcho = stack.Honcho(released, config, processes=["web"], base_port=services.free_low_port())
            honcho.log = released.path / f"honcho-web-{i}.log"
            started.append(honcho)
            honcho.start()
        # PgBouncer opens its min_pool_size once a client came: one does, then wait for all
        # four, so that round robin has several server connections to hand out from the start.
        assert stack.get(started[0].url("/parity/db/"))[0] == 200
        deadline = time.monotonic() + 30
        while server_connections(database) < SERVER_POOL:
            assert time.monotonic() < deadline, f"PgBouncer opened no {SERVER_POOL} connections"
            time.sleep(0.2)
        yield started
    finally:
        for honcho in started:
            honcho.stop()


def server_connections(database):
    """The database's client connections (all PgBouncer's), but the one asking."""
    return int(database.sql(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ))


def load(webs, path, seconds, connections=16):
    """wrk on every web process at once; their results."""
    results = [None] * len(webs)

    def run(i):
        results[i] = stack.wrk(webs[i].url(path), connections, seconds, threads=1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(webs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_every_request_is_answered_by_more_clients_than_the_database_allows(webs, database, pgbouncer):
    clients = []  # the web processes' connections to PgBouncer, sampled during the load
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            ports = 0
            for web in webs:
                for process in web.tree():
                    with contextlib.suppress(psutil.Error):
                        ports += sum(
                            1 for c in process.net_connections("tcp")
                            if c.raddr and c.raddr.port == pgbouncer.port
                        )
            clients.append(ports)

    sampler = threading.Thread(target=sample)
    with stack.ConnectionSampler(database) as servers:
        sampler.start()
        try:
            results = load(webs, "/parity/db/", seconds=4)
        finally:
            done.set()
            sampler.join()

    for result in results:
        assert result["requests"] > 0, result["output"]
        assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result["output"]
    # Straight to the database, these would have been refused ("too many clients").
    assert max(clients) > MAX_CONNECTIONS, clients
    assert servers.samples and servers.peak() <= SERVER_POOL  # PgBouncer's, not one per client


def test_iterator_over_2000_rows_through_pgbouncer(webs):
    status, body = stack.get(webs[0].url("/pgb/iterate/"))

    assert status == 200, body[-2000:]
    assert b'"rows": 2000' in body


def test_a_query_repeated_on_one_connection_is_never_prepared(webs):
    for web in webs:  # each process's pool, several server connections behind it
        status, body = stack.get(web.url("/pgb/repeat/"))
        assert status == 200, body[-2000:]


def test_a_transaction_with_select_for_update_through_pgbouncer(webs):
    for web in webs:
        status, body = stack.get(web.url("/pgb/lock/"))
        assert status == 200, body[-2000:]


def test_20_concurrent_requests_in_one_gevent_worker(released, config):
    one = stack.Honcho(
        released, {**config, "WEB_CONCURRENCY": "1"}, processes=["web"], base_port=services.free_low_port()
    )
    one.log = released.path / "honcho-one-worker.log"
    try:
        one.start()
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: stack.get(one.url("/parity/sleep/?s=0.3"), timeout=30), range(20)))
    finally:
        one.stop()

    assert [status for status, _ in answers] == [200] * 20, answers


def test_a_postgres_restart_under_load_costs_no_request_once_it_is_back(webs, database, pgbouncer):
    masters = [web.gunicorn_master().pid for web in webs]
    during = threading.Thread(target=load, args=(webs, "/parity/db/", 6, 8))
    during.start()
    time.sleep(1.5)
    database.restart()
    during.join()

    results = load(webs, "/parity/db/", seconds=3)
    for result in results:
        assert result["requests"] > 0, result["output"]
        assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result["output"] + pgbouncer.log()
    assert [web.gunicorn_master().pid for web in webs] == masters, "a web process was restarted"
    assert all(web.proc.poll() is None for web in webs), "a web process stopped"


def test_the_worker_and_the_scheduler_run_through_pgbouncer(released, config, database, pgbouncer):
    celery = stack.Honcho(released, config, processes=["worker", "scheduler"])
    celery.log = released.path / "honcho-celery.log"
    try:
        celery.start()
        # The Celery sample's task, enqueued as its page does: a row, then the task.
        code = (
            f"from {NAME}.apps.celery_sample.models import Computation; "
            f"from {NAME}.apps.celery_sample.tasks import send; import uuid; "
            "c = Computation.objects.create(n=1000, task_id=str(uuid.uuid4())); "
            "send(c, 0.1); print(c.pk)"
        )
        enqueued = released.run(f"python manage.py shell -c '{code}'", config)
        assert enqueued.returncode == 0, enqueued.stderr
        pk = int(enqueued.stdout.split()[-1])
        result = f"SELECT coalesce(result::text, '') FROM celery_sample_computation WHERE id = {pk}"
        # beat records each run of a periodic task as it sends it (CELERY_BEAT_SYNC_EVERY = 1).
        beat_ran = (
            "SELECT count(*) FROM django_celery_beat_periodictask "
            "WHERE name = 'celery-sample-send-unsent' AND last_run_at IS NOT NULL"
        )
        deadline = time.monotonic() + 60
        while not (database.sql(result) and database.sql(beat_ran) == "1"):
            assert time.monotonic() < deadline, f"no task ran or beat sent none:\n{celery.tail()}"
            time.sleep(0.5)
        assert int(database.sql(result)) == sum(i * i for i in range(1, 1001))
        # Every connection they hold is to PgBouncer, none straight to the database.
        ports = set()
        for process in celery.tree():
            with contextlib.suppress(psutil.Error):
                ports |= {c.raddr.port for c in process.net_connections("tcp") if c.raddr}
        assert pgbouncer.port in ports and database.port not in ports, ports
    finally:
        celery.stop()


# heroku-buildpack-pgbouncer's bin/start-pgbouncer points DATABASE_URL at its PgBouncer, here.
BUILDPACK_PORT = 6000


def test_the_buildpack_s_database_url_needs_no_tls_and_gets_transaction_settings(released, config, database):
    """The web as `web: bin/start-pgbouncer gunicorn ...` runs it: DATABASE_URL rewritten to
    PgBouncer on 127.0.0.1:6000, which speaks no TLS, in transaction mode; no other setting."""
    bouncer = PgBouncer(database, BUILDPACK_PORT)
    before = server_connections(database)
    web = None
    try:
        bouncer.start()
        dyno = {name: value for name, value in config.items() if not name.startswith("DATABASE_")}
        web = stack.Honcho(
            released, {**dyno, "DATABASE_URL": bouncer.url}, processes=["web"],
            base_port=services.free_low_port(),
        )
        web.log = released.path / "honcho-buildpack.log"
        web.start()
        status, body = stack.get(web.url("/parity/db/"))
        assert status == 200, f"{body[-2000:]}\n{web.tail()}"
        deadline = time.monotonic() + 30  # its server connections open, for round robin
        while server_connections(database) < before + SERVER_POOL:
            assert time.monotonic() < deadline, f"PgBouncer opened no {SERVER_POOL} connections"
            time.sleep(0.2)
        status, body = stack.get(web.url("/pgb/iterate/"))
        assert status == 200, f"{body[-2000:]}\n{web.tail()}"
    finally:
        if web:
            web.stop()
        bouncer.close()
