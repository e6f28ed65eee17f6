"""bin/dev in the daily loop, run as a user runs it (env -i, the stock PATH, a fresh HOME, a project
from the zip): no task is lost when the code changes, at Ctrl-C, or with a second bin/dev."""

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse

import pytest
from conftest import NAME, render, services
from test_first_contact import STOCK_PATH, Browser

TIMEOUT = 180  # seconds to wait for a line before the test fails (not a measure of speed)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    root = render(tmp_path_factory.mktemp("dev"), source="zip")
    result = subprocess.run(["bin/setup"], cwd=root, env=user_env(home), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, home


def user_env(home, **extra):
    return {"HOME": str(home), "PATH": STOCK_PATH, "LANG": "C.UTF-8", **extra}


class Dev:
    """`bin/dev` in a terminal of its own: its output as it comes, and Ctrl-C."""

    def __init__(self, project):
        root, home = project
        self.root, self.home = root, home
        self.port = services.free_port()
        self.proc = subprocess.Popen(
            ["bash", "-e", "-c", "bin/dev"], cwd=root, env=user_env(home, PORT=str(self.port)),
            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, pattern, count=1):
        """The output once `pattern` is in it `count` times; the match of its last time."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.output, re.M))
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.2)
        pytest.fail(f"bin/dev never printed {pattern!r} ({count} times):\n{self.output[-6000:]}")

    def browser(self):
        """A browser on this bin/dev's site, once the site answers."""
        browser = Browser(f"http://127.0.0.1:{self.port}")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                browser.get("/")
                return browser
            time.sleep(0.2)
        pytest.fail(f"no site on port {self.port}:\n{self.output[-6000:]}")

    def ctrl_c(self):
        """SIGINT to the terminal's foreground job, as Ctrl-C sends it; the seconds until it ended."""
        started = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return time.monotonic() - started

    def manage(self, *args):
        result = subprocess.run([".venv/bin/python", "manage.py", *args], cwd=self.root,
                                env=user_env(self.home), capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


@pytest.fixture
def dev(project):
    """A bin/dev, stopped at the end of the test if the test has not stopped it."""
    started = []

    def start():
        started.append(Dev(project))
        return started[-1]

    yield start
    for one in started:
        if one.proc.poll() is None:
            one.ctrl_c()


READY = r"celery@\S+ ready\.$"
NEW_TASK = '''

@shared_task
def shout(word):
    return word.upper()
'''


def test_a_task_added_while_bin_dev_runs_completes(project, dev):
    root, _ = project
    tasks = root / NAME / "apps/core/tasks.py"
    text = tasks.read_text()
    one = dev()
    one.wait_for(READY)
    try:
        tasks.write_text(text + NEW_TASK)  # the owner writes a task, and saves
        one.wait_for(READY, count=2)  # the worker started again with it, as runserver does

        one.manage("shell", "-c", f"from {NAME}.apps.core.tasks import shout; shout.delay('hi')")

        one.wait_for(rf"Task {NAME}\.apps\.core\.tasks\.shout\[[-\w]+\] succeeded in \S+: 'HI'$")
        assert "unregistered task" not in one.output
    finally:
        tasks.write_text(text)


def test_a_task_interrupted_by_ctrl_c_runs_on_the_next_bin_dev(dev):
    one = dev()
    one.wait_for(READY)
    browser = one.browser()
    browser.get("/celery/")
    # The sample's slowest task: 10 s, longer than honcho waits for a process after Ctrl-C.
    _, url, _ = browser.post("/celery/", n="10", seconds="10")
    received = one.wait_for(r"Task \S+sum_squares\[([-\w]+)\] received$")

    seconds = one.ctrl_c()
    print(f"Ctrl-C during the task: bin/dev ended in {seconds:.1f} s")

    task_id = received.group(1)
    assert f"worker: stopped before {NAME}.apps.celery_sample.tasks.sum_squares[{task_id}] ended: it goes " \
           "back to the queue and runs again when the worker starts" in one.output, one.output[-3000:]
    two = dev()
    two.wait_for(rf"Task \S+sum_squares\[{task_id}\] succeeded")
    _, _, page = two.browser().get(urllib.parse.urlsplit(url).path)
    assert re.search(r'id="state">SUCCESS<', page) and re.search(r'id="result">385<', page), page[-2000:]


def test_a_second_bin_dev_does_not_start_a_second_scheduler(dev):
    first = dev()
    first.wait_for(r"beat: Starting\.\.\.$")
    second = dev()  # on another port, as bin/dev says when 8000 is taken
    second.wait_for(r"scheduler\.1 +\| scheduler: this project's scheduler already runs \(pid \d+, another "
                    r"bin/dev\?\): this one waits, and takes over when that one stops$")
    # A task every second, as the owner might add in the admin.
    first.manage("shell", "-c", (
        "from django_celery_beat.models import IntervalSchedule, PeriodicTask; "
        "every = IntervalSchedule.objects.get_or_create(every=1, period='seconds')[0]; "
        "PeriodicTask.objects.update_or_create(name='tick', defaults={'interval': every, "
        "'task': 'celery.backend_cleanup'})"
    ))
    try:
        sent = r"Scheduler: Sending due task tick "
        # The first scheduler has sent it for more than beat's 5 s between reads of the schedule.
        first.wait_for(sent, count=8)
        assert not re.search(sent, second.output), second.output[-3000:]

        first.ctrl_c()

        second.wait_for(r"scheduler: the other one stopped: this one runs$")
        second.wait_for(sent)
    finally:
        second.manage("shell", "-c", "from django_celery_beat.models import PeriodicTask; "
                      "PeriodicTask.objects.filter(name='tick').delete()")
