"""Production parity: a new project built and released as Heroku would, its Procfile run by honcho
against real Postgres, Redis and memcached on loopback, under load and faults.

Every part is checked: static bundles, /celery/ and the worker, /healthz. Loads are short (a few seconds each): figures belong to .ci/bench/parity.py.
"""

import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))

import stack  # noqa: E402
from conftest import NAME  # noqa: E402

WEB_CONCURRENCY = 2
POOL_SIZE = 7  # prod.py's default DATABASE_POOL_SIZE
ADMIN_PASSWORD = "parity-admin-password-1"



@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return stack.Build(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def config(postgres, redis, memcached):
    return stack.config_vars(postgres, redis, memcached, WEB_CONCURRENCY=str(WEB_CONCURRENCY))


@pytest.fixture(scope="module")
def released(build, config):
    """The build step (collectstatic with only the config vars), then the Procfile's release line."""
    collect = build.run("python manage.py collectstatic --noinput", config)
    assert collect.returncode == 0, collect.stdout + collect.stderr
    assert "release" in build.processes, "the Procfile has no release line"
    release = build.run(build.processes["release"], config)
    assert release.returncode == 0, release.stdout + release.stderr
    admin = build.run(
        "python manage.py createsuperuser --noinput --username admin --email admin@example.com",
        {**config, "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD},
    )
    assert admin.returncode == 0, admin.stderr
    return build


@pytest.fixture(scope="module")
def dynos(released, config):
    honcho = stack.Honcho(released, config).start()
    yield honcho
    honcho.stop()


def process_groups(dynos):
    """Each Procfile process's tree, for counting its database connections."""
    return {
        "web": lambda: dynos.processes_of("gunicorn"),
        "worker": lambda: dynos.processes_of("celery worker"),
        "scheduler": lambda: dynos.processes_of("celery beat"),
    }


def enqueue_computation(build, config, seconds):
    """Enqueue the Celery sample's task as its page does (a row, then the task); its row's id."""
    code = (
        "import uuid; "
        f"from {NAME}.apps.celery_sample.models import Computation; "
        f"from {NAME}.apps.celery_sample.tasks import sum_squares; "
        "c = Computation.objects.create(n=1000, task_id=str(uuid.uuid4())); "
        f"sum_squares.apply_async((c.pk, {seconds}), task_id=c.task_id); print(c.pk)"
    )
    result = build.run(f"python manage.py shell -c '{code}'", config)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


def computation(postgres, pk):
    """(attempts, result) of a Computation row, read straight from the database."""
    attempts, result = postgres.sql(
        f"SELECT attempts, coalesce(result::text, '') FROM celery_sample_computation WHERE id = {pk}"
    ).split("|")
    return int(attempts), (int(result) if result else None)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout} s")


SUM_SQUARES_1000 = sum(i * i for i in range(1, 1001))


def test_gunicorn_config_is_valid_and_follows_heroku(build, config):
    env = {**config, "PORT": "5123", "WEB_CONCURRENCY": "3"}
    check = build.run("gunicorn --check-config", env)
    assert check.returncode == 0, check.stdout + check.stderr

    printed = build.run("gunicorn --print-config", env)
    assert printed.returncode == 0, printed.stderr
    values = dict(re.findall(r"^(\w+)\s+= (.*)$", printed.stdout, re.M))
    assert values["bind"] == "['0.0.0.0:5123']"
    assert values["workers"] == "3"
    assert values["worker_class"] == "gevent"
    assert int(values["worker_connections"]) <= 1000
    assert int(values["timeout"]) <= 30  # Heroku's router answers H12 after 30 s
    assert int(values["graceful_timeout"]) < 30  # Heroku sends SIGKILL 30 s after SIGTERM
    assert int(values["keepalive"]) > 90  # longer than Router 2.0's idle keep-alive
    assert values["accesslog"] == "-"
    assert values["max_requests"] == "0"  # never replaced: recycling cost 38% of req/s
    assert values["preload_app"] == "True"  # so a worker's replacement is a fork, not an import
    assert values["forwarded_allow_ips"] == "['*']"


def test_a_bad_gunicorn_variable_stops_the_start_with_one_line(build, config):
    # (WEB_CONCURRENCY gunicorn parses itself, before reading gunicorn.conf.py.)
    env = {**config, "PORT": "x", "GUNICORN_WORKER_CONNECTIONS": "0"}
    check = build.run("gunicorn --check-config", env)

    assert check.returncode == 1
    assert check.stdout + check.stderr == (
        "GUNICORN_WORKER_CONNECTIONS must be a whole number >= 1:"
        " e.g. GUNICORN_WORKER_CONNECTIONS=500\n"
        "PORT is not a whole number: e.g. PORT=8000\n"
    )
    # A port out of range, as a typo gives it.
    check = build.run("gunicorn --check-config", {**config, "PORT": "70000"})
    assert check.returncode == 1
    assert check.stdout + check.stderr == "PORT must be a whole number from 1 to 65535: e.g. PORT=8000\n"
    # gunicorn parses WEB_CONCURRENCY itself at import (its traceback); on Heroku a config change
    # runs the release phase first, whose failure keeps the value from every dyno.
    release = build.run(build.processes["release"], {**config, "WEB_CONCURRENCY": "abc"})
    assert release.returncode == 1
    assert release.stdout + release.stderr == "WEB_CONCURRENCY is not a whole number: e.g. WEB_CONCURRENCY=2\n"


def test_web_process_serves_the_hello_page(dynos):
    status, body = stack.get(dynos.url("/"))
    assert status == 200
    assert NAME.encode() in body


def test_access_log_lines_carry_the_request_id_as_heroku_sends_it(dynos):
    request_id = f"access-{time.time_ns()}"
    # A quote in a field is escaped: it cannot end the field and forge the rest of the line.
    headers = {"X-Request-ID": request_id, "User-Agent": 'probe" 500 "forged'}
    for path in ("/", "/no-such-page/"):
        stack.get(dynos.url(path), headers=headers)

    def access_lines():
        lines = [line for line in dynos.log.read_text().splitlines() if f"request_id={request_id} " in line]
        return [line for line in lines if '"GET / HTTP' in line], [line for line in lines if " 404 " in line]

    # gunicorn writes an access line after its response, and honcho passes it on later still.
    wait_for(lambda: all(access_lines()), 10, f"no access log line for both requests: {access_lines()}")
    hello = access_lines()[0][0]
    assert re.search(r'"GET / HTTP/1.1" 200 \d+ \d+ms "-" "probe\\" 500 \\"forged"$', hello), hello


def test_the_first_request_is_answered_before_the_fork_and_leaves_no_connection(dynos, postgres):
    """gunicorn's main process answers GET / before forking (libs/prefork.py): the workers share
    what it set up, and no database connection, which two processes must never share."""
    stack.wait_for_200(dynos.url("/"))
    assert "the first request (GET /: 200 OK) answered before forking" in dynos.log.read_text()
    master = dynos.gunicorn_master()
    held = [c for c in master.net_connections("tcp") if c.raddr and c.raddr.port == postgres.port]
    assert not held, held


def test_admin_login_works(dynos):
    """As through Heroku's router: HTTPS ends there, X-Forwarded-Proto says so, cookies are Secure."""
    https = {"X-Forwarded-Proto": "https"}
    opener = urllib.request.build_opener(NoRedirect)
    with opener.open(urllib.request.Request(dynos.url("/admin/login/"), headers=https)) as page:
        cookies = cookie_header(page)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.read().decode()).group(1)
    form = urllib.parse.urlencode({
        "csrfmiddlewaretoken": token, "username": "admin", "password": ADMIN_PASSWORD,
        "next": "/admin/",
    }).encode()
    origin = f"https://127.0.0.1:{dynos.port}"
    login = urllib.request.Request(dynos.url("/admin/login/"), data=form, headers={
        **https, "Cookie": cookies, "Origin": origin, "Referer": f"{origin}/admin/login/",
    })
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(login, timeout=10)
    assert redirect.value.code == 302 and redirect.value.headers["Location"] == "/admin/"
    session = cookie_header(redirect.value)
    assert "sessionid=" in session

    admin = urllib.request.Request(dynos.url("/admin/"), headers={**https, "Cookie": session})
    with opener.open(admin, timeout=10) as response:
        assert response.status == 200
        assert "Site administration" in response.read().decode()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


def cookie_header(response):
    """The cookies a response sets, as a Cookie header (Secure ones too: the router did HTTPS)."""
    return "; ".join(c.split(";")[0] for c in response.headers.get_all("Set-Cookie") or [])


def test_database_page_answers(dynos):
    status, body = stack.get(dynos.url("/parity/db/"))
    assert status == 200 and b"add_" in body


def test_static_files_and_bundles_are_served(dynos):
    urls = set()
    for page in ("/", "/admin/login/"):
        urls |= set(re.findall(r'(?:href|src)="(/static/[^"]+)"', stack.get(dynos.url(page))[1].decode()))
    assert urls, "no page links a static file"
    for url in sorted(urls):
        status, body = stack.get(dynos.url(url))
        assert status == 200 and body, url


def test_health_endpoint_answers(dynos):
    status, _ = stack.get(dynos.url("/healthz"))
    assert status == 200


def test_a_flag_turned_on_by_another_process_shows_on_every_worker_within_seconds(dynos, released, config):
    """Flags are kept 5 s in each process's memory (WAFFLE_CACHE_NAME): one switched on elsewhere
    (the admin, on another dyno; here `manage.py shell`) reaches both web workers soon after."""
    news = b'id="hello-news"'
    assert news not in stack.get(dynos.url("/"))[1]
    flags = "from waffle.models import Flag; Flag.objects"
    on = released.run(f"python manage.py shell -c '{flags}.create(name=\"hello_news\", everyone=True)'", config)
    assert on.returncode == 0, on.stderr
    try:
        # Several pages in a row: the two workers take turns, so both must have it.
        wait_for(lambda: all(news in stack.get(dynos.url("/"))[1] for _ in range(6)), 15,
                 "the flag did not show on every worker")
    finally:
        off = released.run(f"python manage.py shell -c '{flags}.all().delete()'", config)
        assert off.returncode == 0, off.stderr


def test_celery_page_answers_and_the_worker_runs_its_task(dynos, released, config, postgres):
    status, _ = stack.get(dynos.url("/celery/"))
    assert status == 200
    pk = enqueue_computation(released, config, seconds=0)
    wait_for(lambda: computation(postgres, pk)[1], 30, "the worker did not run the task")
    status, body = stack.get(dynos.url(f"/celery/{pk}/"))
    assert status == 200 and str(SUM_SQUARES_1000).encode() in body


def test_worker_killed_mid_task_loses_nothing(dynos, released, config, postgres):
    """A worker process killed mid-task (as the kernel's OOM killer would): the task runs again."""
    pk = enqueue_computation(released, config, seconds=4)
    wait_for(lambda: computation(postgres, pk)[0] >= 1, 30, "the task never started")
    children = dynos.master("celery worker").children()
    assert children, "the worker has no pool processes"
    for child in children:
        child.kill()

    wait_for(lambda: computation(postgres, pk)[1], 60, "the task was lost with its worker")
    attempts, result = computation(postgres, pk)
    assert result == SUM_SQUARES_1000
    assert attempts >= 2  # it ran again after the kill


@pytest.mark.parametrize("connections", [64, 256])
@pytest.mark.parametrize("path", ["/", "/parity/db/"])
def test_load_gives_no_errors_and_bounded_connections(dynos, postgres, path, connections):
    with stack.ConnectionSampler(postgres, process_groups(dynos)) as sampler:
        result = stack.wrk(dynos.url(path), connections, seconds=3)

    peaks = {group: sampler.peak(group) for group in ("total", "web", "worker", "scheduler")}
    print(f"{path} c={connections}: {result['rps']} req/s, p99 {result['p99_ms']} ms, "
          f"database connections at most {peaks}")
    assert result["requests"] > 0, result["output"]
    assert result["non_2xx"] == 0, result["output"]
    assert result["socket_errors"] == 0, result["output"]
    assert sampler.samples, "pg_stat_activity was never read"
    assert sampler.peak("web") <= WEB_CONCURRENCY * POOL_SIZE
    assert sampler.peak() <= stack.PLAN_CONNECTION_LIMIT
    if path == "/parity/db/":
        assert sampler.peak("web") >= 1


def test_connection_budget_holds_with_web_under_load_and_the_worker_busy(dynos, released, config, postgres):
    """README's budget: web 2 x 7 + worker 3 (its 2 processes, and its main process once one was
    lost, as in test_worker_killed_mid_task_loses_nothing) + scheduler 1, every part busy at once,
    and one left for the release phase or `heroku run` within essential-0's 20."""
    tasks = [enqueue_computation(released, config, seconds=4) for _ in range(2 * WEB_CONCURRENCY)]
    wait_for(lambda: all(computation(postgres, pk)[0] >= 1 for pk in tasks[:WEB_CONCURRENCY]), 30,
             "the worker never ran both tasks at once")
    with stack.ConnectionSampler(postgres, process_groups(dynos)) as sampler:
        result = stack.wrk(dynos.url("/parity/sleep/?s=0.05"), 256, seconds=3, timeout="30s")

    peaks = {group: sampler.peak(group) for group in ("total", "web", "worker", "scheduler")}
    print(f"database connections at most {peaks}")
    assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result["output"]
    assert peaks["web"] == WEB_CONCURRENCY * POOL_SIZE  # the load used every pooled connection
    assert WEB_CONCURRENCY <= peaks["worker"] <= WEB_CONCURRENCY + 1  # one per process, all busy
    assert peaks["scheduler"] <= 1
    budget = WEB_CONCURRENCY * POOL_SIZE + (WEB_CONCURRENCY + 1) + 1  # 18
    assert peaks["total"] <= budget and budget + 1 <= stack.PLAN_CONNECTION_LIMIT
    for pk in tasks:
        wait_for(lambda: computation(postgres, pk)[1], 60, "a task did not finish")


def test_a_request_waiting_too_long_for_a_pooled_connection_fails_clearly(released, config):
    """One worker with a pool of one connection: a second request waits DATABASE_POOL_TIMEOUT,
    then gets a 503 with Retry-After and PoolTimeout in the log, instead of hanging until the
    router gives up."""
    port = stack.services.free_port()
    env = {**config, "PORT": str(port), "WEB_CONCURRENCY": "1",
           "DATABASE_POOL_SIZE": "1", "DATABASE_POOL_TIMEOUT": "1"}
    log = released.path / "pool-timeout.log"
    with open(log, "w") as out:
        web = stack.subprocess.Popen(
            ["gunicorn", "--config", "gunicorn.conf.py"], cwd=released.path,
            env=released.env(env), stdout=out, stderr=stack.subprocess.STDOUT,
        )
    try:
        stack.wait_for_200(f"http://127.0.0.1:{port}/", timeout=60)
        answers = {}

        def call(name):
            started = time.monotonic()
            status, _ = stack.get(f"http://127.0.0.1:{port}/parity/sleep/?s=8", timeout=30)
            answers[name] = (status, time.monotonic() - started)

        first = threading.Thread(target=call, args=("first",))
        first.start()
        time.sleep(0.5)
        call("second")
        first.join(30)
    finally:
        web.terminate()
        web.wait(30)

    assert answers["first"][0] == 200
    status, took = answers["second"]
    assert status == 503 and took < 6, answers  # failed after about 1 s, not after the 8 s wait
    assert "couldn't get a connection after 1.00 sec" in log.read_text()


def test_connections_the_database_ended_are_replaced_before_they_are_lent(dynos, postgres):
    """The pool lends a connection it lent a moment ago without checking it (libs/postgres),
    unless the server has said something since: connections the database ended are replaced."""
    result = stack.wrk(dynos.url("/parity/db/"), 32, seconds=2)  # every pooled one lent just now
    assert result["non_2xx"] == 0, result["output"]
    sampler = stack.ConnectionSampler(postgres)
    ports = sampler._ports(dynos.processes_of("gunicorn"))
    assert ports, "web holds no pooled connection after the load"
    # With a timeout, pg_terminate_backend returns once the backend has exited: the connections
    # are ended, not about to be, when the load starts again.
    ended = postgres.sql(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
        f"WHERE client_port IN ({','.join(map(str, ports))})"
    )
    assert int(ended) == len(ports)

    result = stack.wrk(dynos.url("/parity/db/"), 32, seconds=2)
    assert result["requests"] > 0 and result["non_2xx"] == 0, result["output"]
    assert result["socket_errors"] == 0, result["output"]


def test_postgres_restart_under_load_recovers_without_restarting_the_app(dynos, postgres):
    master = dynos.gunicorn_master().pid
    load = threading.Thread(target=stack.wrk, args=(dynos.url("/parity/db/"), 32, 6))
    load.start()
    time.sleep(1.5)
    postgres.stop()
    status_while_down, _ = stack.get(dynos.url("/parity/db/"), timeout=30)
    postgres.start()
    load.join()

    assert status_while_down in (500, 503)  # the page fails while the database is down...
    status_once_back, _ = stack.get(dynos.url("/parity/db/"), timeout=30)
    assert status_once_back == 200  # ...and not once it is back: dead connections are replaced
    result = stack.wrk(dynos.url("/parity/db/"), 64, seconds=2)
    assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result["output"]
    assert dynos.gunicorn_master().pid == master, "the app was restarted"
    assert dynos.proc.poll() is None, f"a process stopped:\n{dynos.tail()}"


def test_redis_restart_leaves_the_app_working(dynos, redis, released, config, postgres):
    master = dynos.gunicorn_master().pid
    load = threading.Thread(target=stack.wrk, args=(dynos.url("/"), 32, 4))
    load.start()
    time.sleep(1)
    redis.restart()
    load.join()

    pages = ["/", "/parity/db/", "/healthz", "/celery/"]
    for page in pages:
        stack.wait_for_200(dynos.url(page), timeout=30)
    result = stack.wrk(dynos.url("/"), 64, seconds=2)
    assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result["output"]
    assert dynos.gunicorn_master().pid == master, "the app was restarted"
    assert dynos.proc.poll() is None, f"a process stopped:\n{dynos.tail()}"
    # The worker reconnects to the broker by itself.
    pk = enqueue_computation(released, config, seconds=0)
    wait_for(lambda: computation(postgres, pk)[1], 60, "no task ran after Redis restarted")


def test_sigterm_to_web_under_load_finishes_requests_in_flight(dynos, postgres):
    """Last of the honcho tests: honcho stops every process once web exits, as Foreman does."""
    master = dynos.gunicorn_master()
    answers = []

    def slow_request():
        answers.append(stack.get(dynos.url("/parity/sleep/?s=4"), timeout=30)[0])

    def sleeping():
        return int(postgres.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep%'"
            " AND pid <> pg_backend_pid()"
        ))

    # 6: fewer than one worker's pool (7), so all run at once wherever gunicorn puts them.
    in_flight = [threading.Thread(target=slow_request, daemon=True) for _ in range(6)]
    for thread in in_flight:
        thread.start()
    # In flight: the app has them and is waiting in the database (not still in the listen queue).
    wait_for(lambda: sleeping() >= 6, 15, "the slow requests never all reached the database")
    load = threading.Thread(target=stack.wrk, args=(dynos.url("/"), 64, 4))
    load.start()
    time.sleep(0.5)
    started = time.monotonic()
    master.send_signal(signal.SIGTERM)  # what Heroku sends every process of a stopping dyno
    master.wait(60)
    took = time.monotonic() - started
    for thread in in_flight:
        thread.join(30)
    load.join()

    print(f"web exited {took:.2f} s after SIGTERM")
    assert answers == [200] * 6, "a request in flight was cut off"
    assert took < 30, "Heroku would have killed the dyno (SIGKILL after 30 s)"
