"""A new user's first hour, word for word: the guide's and the new project's README's shell blocks,
run as written in a clean shell (env -i, a fresh HOME, a stock PATH, so python3 is the OS's) from a
GitHub-style zip. Nothing here helps a step that the READMEs do not: if one needs something, the
README must say it. Only the template's address is replaced (by the zip) and the throwaway
virtualenv's folder (by a temporary one, so that runs cannot collide)."""

import contextlib
import http.cookiejar
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import psutil
import pytest
from conftest import GUIDE, TEMPLATE, make_zip, services

NAME = "mysite"
STOCK_PATH = "/usr/local/bin:/usr/bin:/bin"
ZIP_URL = "https://github.com/djeroku/djeroku/archive/main.zip"


def shell_blocks(text, heading):
    """The ```sh blocks of the section `heading` (a level-2 heading) of a README."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```$", section, re.M | re.S)


class User:
    """A shell as a new user has it, in `cwd`: nothing from this process's environment."""

    def __init__(self, home, cwd, port):
        self.cwd = cwd
        self.env = {"HOME": str(home), "PATH": STOCK_PATH, "LANG": "C.UTF-8"}
        if port != 8000:  # someone else has 8000 here: the README's own way round it
            self.env["PORT"] = str(port)

    def run(self, block, timeout=900):
        return subprocess.run(
            ["bash", "-e", "-c", block], cwd=self.cwd, env=self.env, timeout=timeout,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def start(self, block):
        """A long-running block, in its own process group as a terminal's foreground job is."""
        return subprocess.Popen(
            ["bash", "-e", "-c", block], cwd=self.cwd, env=self.env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def answer(self, block, answers, timeout=120):
        """Run `block` on a terminal, typing each answer after the prompt that matches it."""
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(self.cwd)
            os.execve("/bin/bash", ["bash", "-e", "-c", block], self.env)
        out, deadline = b"", time.monotonic() + timeout
        pending = list(answers)
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
                if pending and re.search(pending[0][0], out.decode(errors="replace").rsplit("\n", 1)[-1]):
                    os.write(fd, pending.pop(0)[1].encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


class Browser:
    """urllib with cookies, and Django's CSRF token taken from the last page, as a browser posts."""

    def __init__(self, base):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.page = ""

    def get(self, path):
        with self.opener.open(self.base + path, timeout=10) as response:
            self.page = response.read().decode()
            return response.status, response.url, self.page

    def post(self, path, **fields):
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', self.page).group(1)
        data = urllib.parse.urlencode({"csrfmiddlewaretoken": token, **fields}).encode()
        request = urllib.request.Request(self.base + path, data, headers={"Referer": self.base + path})
        with self.opener.open(request, timeout=10) as response:
            self.page = response.read().decode()
            return response.status, response.url, self.page


def wait_for_page(browser, path, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("bin/dev stopped:\n" + proc.stdout.read()[-5000:])
        with contextlib.suppress(OSError):
            return browser.get(path)
        time.sleep(0.5)
    pytest.fail(f"no page at {path} after {timeout} s")


def ctrl_c(proc):
    """What Ctrl-C in the terminal does: SIGINT to the foreground process group. Returns the
    seconds until every process of the run had gone, and what it printed."""
    started = time.monotonic()
    tree = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
    while any(alive(pid) for pid in tree) and time.monotonic() - started < 30:
        time.sleep(0.05)
    return time.monotonic() - started, out


def port_is_free(port):
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def passed(output):
    match = re.search(r"(\d+) passed", output)
    return int(match.group(1)) if match else 0


def test_a_new_user_follows_the_readmes_word_for_word(tmp_path):
    template = make_zip(tmp_path / "djeroku-main.zip")
    guide = GUIDE.read_text()
    install, first_run = shell_blocks(guide, "Start a project")
    install = install.replace(ZIP_URL, str(template)).replace("/tmp/django", str(tmp_path / "django"))
    port = 8000 if port_is_free(8000) else services.free_port()
    user = User(tmp_path / "home", tmp_path, port)
    (tmp_path / "home").mkdir()

    # The guide: a throwaway Django, startproject from the zip, then `cd mysite && bin/dev`.
    result = user.run(install)
    assert result.returncode == 0, result.stdout[-5000:]
    project = tmp_path / NAME
    readme = (project / "README.md").read_text()
    assert "django-admin" not in readme and ".ci/" not in readme, "the template's guide was copied"
    run_block, superuser_block = shell_blocks(readme, "Run it on this machine")
    [test_block] = shell_blocks(readme, "Test")
    [addapp_block] = shell_blocks(readme, "Add an app")
    assert first_run.strip().splitlines() == [f"cd {NAME}", run_block.strip()]

    dev = user.start(first_run)
    browser = Browser(f"http://127.0.0.1:{port}")
    try:
        status, _, page = wait_for_page(browser, "/", dev)
        assert status == 200 and f"Hello from {NAME}" in page and f"<title>{NAME}</title>" in page

        # A login for the admin, typed at createsuperuser's prompts in a second terminal.
        project_user = User(tmp_path / "home", project, port)
        code, out = project_user.answer(superuser_block, [
            (r"Username.*: $", "owner"), (r"Email address: $", "owner@example.com"),
            (r"Password: $", "a-long-Passw0rd"), (r"Password \(again\): $", "a-long-Passw0rd"),
        ])
        assert code == 0 and "Superuser created successfully" in out, out
        browser.get("/admin/login/?next=/admin/")
        status, url, page = browser.post("/admin/login/?next=/admin/", username="owner", password="a-long-Passw0rd")
        assert url.endswith("/admin/") and "Site administration" in page, page[-2000:]

        # A task through the sample, run by the worker that bin/dev started.
        browser.get("/celery/")
        status, url, page = browser.post("/celery/", n="10", seconds="0")
        deadline = time.monotonic() + 60
        while 'id="result"' not in page and time.monotonic() < deadline:
            time.sleep(0.5)
            status, _, page = browser.get(urllib.parse.urlsplit(url).path)
        assert re.search(r'id="state">SUCCESS<', page) and re.search(r'id="result">385<', page), page[-2000:]

        status, _, page = browser.get("/healthz")
        assert status == 200 and '"status": "ok"' in page

        # The README's test command, then its new app.
        result = project_user.run(test_block)
        assert result.returncode == 0 and passed(result.stdout), result.stdout[-5000:]
        tests_before = passed(result.stdout)
        result = project_user.run(addapp_block)
        assert result.returncode == 0, result.stdout
    finally:
        seconds, out = ctrl_c(dev)
    assert seconds < 3, f"Ctrl-C took {seconds:.1f} s:\n{out[-3000:]}"
    assert "ERROR" not in out and "Traceback" not in out, out[-5000:]

    # "restart bin/dev": the app's page, then bin/test with its test.
    dev = project_user.start(run_block)
    try:
        status, _, page = wait_for_page(browser, "/blog/", dev, timeout=120)
        assert "blog works" in page and f"<title>{NAME}</title>" in page
        assert f"Edit {NAME}/apps/blog/jinja2/blog/index.html" in page
    finally:
        ctrl_c(dev)
    result = project_user.run(test_block)
    assert result.returncode == 0 and passed(result.stdout) == tests_before + 1, result.stdout[-5000:]


