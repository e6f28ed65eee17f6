"""Fixtures for the template's tests: render a project from this repo, install it, start servers."""

import os
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import services  # noqa: E402

TEMPLATE = Path(__file__).resolve().parents[2]
# The template's own guide (GitHub shows it first); the root README.md is the new project's.
GUIDE = TEMPLATE / ".github" / "README.md"
NAME = "mysite"
# The Python the shared project's .venv is made with: production's, from .python-version.
PROJECT_PYTHON = os.environ.get("PROJECT_PYTHON", "python3.13")
SEED_COMMAND = "django-admin startproject --template={template} --extension=py,html {name}"


def readme_command():
    """The startproject command exactly as the template's guide gives it, the template filled in."""
    text = GUIDE.read_text()
    match = re.search(r"(django-admin startproject .*) (\w+)$", text, re.M)
    assert match, f"{GUIDE} gives no django-admin startproject command"
    command = match.group(1).replace("https://github.com/djeroku/djeroku/archive/main.zip", "{template}")
    return f"{command} {{name}}"


def template_files():
    """The files a GitHub archive of the repo would hold: tracked plus new, not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=TEMPLATE, check=True, capture_output=True, text=True,
    ).stdout
    return [f for f in sorted(set(out.split("\0"))) if f and (TEMPLATE / f).is_file()]


def make_zip(dest):
    """A zip like GitHub's archive: everything under one top folder."""
    with zipfile.ZipFile(dest, "w") as archive:
        for name in template_files():
            archive.write(TEMPLATE / name, f"djeroku-main/{name}")
    return dest


def render(tmp_path, command=SEED_COMMAND, source="folder", name=NAME):
    """Run startproject as a user would and return the new project's folder."""
    template = make_zip(tmp_path / "djeroku-main.zip") if source == "zip" else TEMPLATE
    args = shlex.split(command.format(template=template, name=name))
    django_admin = Path(sys.executable).with_name("django-admin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    subprocess.run([str(django_admin), *args[1:]], cwd=tmp_path, check=True, env=env)
    return tmp_path / name


@dataclass
class Project:
    """A rendered, installed project: run its manage.py and tools from its .venv."""

    path: Path

    @property
    def bin(self):
        return self.path / ".venv" / "bin"

    def env(self, **extra):
        """For the production processes: the venv's bin first on PATH, as on a Heroku dyno."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.bin}:{env['PATH']}"
        return {**env, **extra}

    def run(self, *args, check=True, env=None, **kw):
        return subprocess.run(
            [str(a) for a in args], cwd=self.path, env=self.env(**(env or {})),
            check=check, capture_output=True, text=True, **kw,
        )

    def manage(self, *args, **kw):
        return self.run(self.bin / "python", "manage.py", *args, **kw)

    def install_prod(self):
        """Add reqs/prod.txt (gunicorn, newrelic...), which Heroku installs and bin/setup does not,
        with the uv that bin/setup put in .venv (the versions both locks share are the same)."""
        self.run(self.bin / "uv", "pip", "install", "--quiet", "--require-hashes",
                 "--python", self.bin / "python", "--requirement", "reqs/prod.txt",
                 env={"UV_SYSTEM_CERTS": "1"})


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    """One project rendered by the README's command and set up by bin/setup, shared by the tests."""
    path = render(tmp_path_factory.mktemp("readme"), readme_command())
    subprocess.run(["bin/setup"], cwd=path, check=True, env={**os.environ, "PYTHON": PROJECT_PYTHON})
    return Project(path)


@pytest.fixture(scope="session")
def postgres():
    server = services.Postgres().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis():
    server = services.redis().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def memcached():
    server = services.memcached().start()
    yield server
    server.close()


def pytest_terminal_summary(terminalreporter):
    """Print each test's recorded "summary" property (the project's size) in CI's log, with or
    without pytest-xdist."""
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "summary" and report.when == "call":
                terminalreporter.write_line(value)
