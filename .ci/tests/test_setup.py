"""bin/setup and bin/lock as a new user runs them: a project from the zip, a clean shell (`env -i`,
the stock PATH, a fresh HOME shared by this module's tests as one user's package cache is)."""

import glob
import subprocess
from pathlib import Path

import pytest
from conftest import NAME, render

STOCK_PATH = "/usr/local/bin:/usr/bin:/bin"
STEPS = ("bin/setup: making .venv with", "bin/setup: installing reqs/dev.txt (uv)",
         "bin/setup: applying migrations")
# A Python older than the project supports, to pick on purpose (pyenv's, as this machine has).
OLD_PYTHON = next(iter(sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.10.*/bin/python3.10")))), None)
# Another supported Python, which an OS or pyenv upgrade could put behind .venv/bin/python.
OTHER_PYTHON = next(iter(sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.12.*/bin/python3.12")))), None)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


def user_env(home, **extra):
    return {"HOME": str(home), "PATH": STOCK_PATH, **extra}


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    return result, result.stdout.splitlines()


def python_version(python, path=STOCK_PATH):
    out = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                         env={"PATH": path}, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.fixture(scope="module")
def stock(tmp_path_factory, home):
    """A project set up by bin/setup with nothing but the OS's python3 (Debian 12: 3.11.2)."""
    root = render(tmp_path_factory.mktemp("stock"), source="zip")
    result, lines = run(["bin/setup"], root, user_env(home))
    return root, result, lines


def test_stock_python3_is_used_with_one_line_about_production(stock):
    root, result, lines = stock
    version = python_version("python3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    about_python = [line for line in lines if not line.startswith(STEPS)]
    if version.startswith("3.13."):
        assert about_python == []
    else:
        assert about_python == [
            f"bin/setup: using python3 (Python {version}); production runs Python 3.13 "
            "(.python-version), install it to match"
        ]
    assert [line for line in lines if line.startswith(STEPS)] == [
        f"bin/setup: making .venv with Python {version} (python3)", *STEPS[1:]
    ]
    assert python_version(str(root / ".venv/bin/python")) == version


def test_stock_python3_passes_the_project_tests(stock, home):
    root, _, _ = stock
    result, _ = run(["bin/test", "-q"], root, user_env(home))

    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_second_run_installs_nothing(stock, home):
    root, _, _ = stock
    site = root / ".venv/lib"
    before = {p: p.stat().st_mtime_ns for p in site.glob("*/site-packages/*")}

    result, lines = run(["bin/setup"], root, user_env(home))

    assert result.returncode == 0, result.stdout + result.stderr
    assert lines == ["bin/setup: applying migrations"]
    assert {p: p.stat().st_mtime_ns for p in site.glob("*/site-packages/*")} == before


def test_lock_test_fails_on_an_edited_range_and_bin_lock_mends_it(stock, home):
    root, _, _ = stock
    env = user_env(home)
    # The lock's own tests; not the memo pin, which rightly fails once Django moves from 5.2.19.
    lock_test = ["bin/test", "-q", f"{NAME}/apps/core/tests/test_locks.py", "-k", "not measured"]
    common, locks = root / "reqs/common.in", [root / "reqs/dev.txt", root / "reqs/prod.txt"]
    texts = [f.read_text() for f in (common, *locks)]
    text = texts[0]
    assert run(lock_test, root, env)[0].returncode == 0
    try:
        common.write_text(text.replace("Django~=5.2.19", "Django~=5.2.0,<5.2.19"))
        result, _ = run(lock_test, root, env)
        assert result.returncode == 1
        assert ("reqs/dev.txt pins django 5.2.19, outside Django<5.2.19,~=5.2.0 (reqs/*.in): run bin/lock"
                in result.stdout)

        result, lines = run(["bin/lock"], root, env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert lines == ["bin/lock: wrote reqs/prod.txt and reqs/dev.txt; bin/setup installs the new dev lock"]
        assert "django==5.2.18 " in (root / "reqs/prod.txt").read_text()
        result, lines = run(lock_test, root, env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "bin/setup: installing reqs/dev.txt (uv)" in lines  # bin/test set up the new lock
        assert python_version(str(root / ".venv/bin/python"))  # and the venv still runs
        django = subprocess.run([root / ".venv/bin/python", "-c", "import django; print(django.__version__)"],
                                capture_output=True, text=True).stdout.strip()
        assert django == "5.2.18"
    finally:
        for f, saved in zip((common, *locks), texts, strict=True):
            f.write_text(saved)


def imports_django(root):
    return subprocess.run([root / ".venv/bin/python", "-c", "import django"], capture_output=True).returncode == 0


@pytest.mark.parametrize("loss", ["a deleted folder", "an uninstall"])
def test_a_venv_that_lost_a_package_is_repaired(stock, home, loss):
    root, _, _ = stock
    run(["bin/setup"], root, user_env(home))  # .venv as its lock says (an earlier test relocked)
    if loss == "an uninstall":
        subprocess.run([root / ".venv/bin/uv", "pip", "uninstall", "--quiet", "--python", root / ".venv/bin/python",
                        "django"], check=True, env=user_env(home))
    else:
        [django] = glob.glob(str(root / ".venv/lib/python3.*/site-packages/django"))
        subprocess.run(["rm", "-r", django], check=True)
    assert not imports_django(root)

    result, lines = run(["bin/setup"], root, user_env(home))

    assert result.returncode == 0, result.stdout + result.stderr
    assert lines == ["bin/setup: .venv has lost packages of reqs/dev.txt or their files (django): installing them again",
                     *STEPS[1:]]
    assert imports_django(root)
    assert run(["bin/setup"], root, user_env(home))[1] == [STEPS[2]]


@pytest.mark.skipif(not OTHER_PYTHON, reason="no Python 3.12 from pyenv on this machine")
def test_a_venv_whose_python_changed_is_made_again(stock, home):
    root, _, _ = stock
    made = python_version(str(root / ".venv/bin/python"))
    (root / ".venv/bin/python").unlink()
    (root / ".venv/bin/python").symlink_to(OTHER_PYTHON)  # as when the Python it pointed to is upgraded
    now = python_version(OTHER_PYTHON)
    assert not imports_django(root)

    result, lines = run(["bin/setup"], root, user_env(home))

    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[0] == f"bin/setup: .venv was made with Python {made} and its python is now Python {now}: making it again"
    assert lines[-3:] == [f"bin/setup: making .venv with Python {made} (python3)", *STEPS[1:]]
    assert imports_django(root) and python_version(str(root / ".venv/bin/python")) == made


def test_preferred_python_from_pyenv_without_a_line_about_it(tmp_path, home):
    pyenv = Path.home() / ".pyenv"
    if not (pyenv / "bin/pyenv").exists():
        pytest.skip("no pyenv on this machine")
    root = render(tmp_path, source="zip")
    env = user_env(home, PYENV_ROOT=str(pyenv), PATH=f"{pyenv}/bin:{STOCK_PATH}")
    prefix = subprocess.run(["pyenv", "prefix", "3.13"], env=env, capture_output=True, text=True).stdout.strip()

    result, lines = run(["bin/setup"], root, env)

    assert result.returncode == 0, result.stdout + result.stderr
    version = python_version(f"{prefix}/bin/python3.13")
    assert lines == [f"bin/setup: making .venv with Python {version} ({prefix}/bin/python3.13)", *STEPS[1:]]


@pytest.mark.skipif(not OLD_PYTHON, reason="no Python 3.10 from pyenv on this machine")
def test_unsupported_python_stops_with_one_line(tmp_path, home):
    root = render(tmp_path, source="zip")
    version = python_version(OLD_PYTHON)

    result, lines = run(["bin/setup"], root, user_env(home, PYTHON=OLD_PYTHON))
    assert result.returncode == 1 and result.stderr == ""
    assert lines == [f"bin/setup: PYTHON={OLD_PYTHON} is Python {version}, and this project needs 3.11, 3.12 or 3.13"]

    # An OS whose python3 is too old (Ubuntu 22.04 has 3.10), and no python3.13.
    path = f"{Path(OLD_PYTHON).parent}:{STOCK_PATH}"
    result, lines = run(["bin/setup"], root, {"HOME": str(home), "PATH": path})
    assert result.returncode == 1 and result.stderr == ""
    assert lines == [f"bin/setup: python3 is Python {version}, and this project needs Python 3.11, 3.12 "
                     "or 3.13: install Python 3.13 (what production runs)"]

    result, lines = run(["bin/setup"], root, user_env(home, PYTHON="python3.9"))
    assert result.returncode == 1 and result.stderr == ""
    assert lines == ["bin/setup: PYTHON=python3.9 does not run: set it to a Python 3.11, 3.12 or 3.13"]
    assert not (root / ".venv").exists()


def test_project_named_like_a_dependency_stops_with_one_line(tmp_path, home):
    root = render(tmp_path, source="zip", name="celery")

    for _ in range(2):  # the first run, and again: nothing was stamped as done
        result, lines = run(["bin/setup"], root, user_env(home))
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        assert lines[-1].startswith("bin/setup: the project's name 'celery' is also an installed package (")
        assert lines[-1].endswith("): start the project again with another name")
        assert "bin/setup: applying migrations" not in lines


def test_keyword_project_name_stops_with_one_line(tmp_path, home):
    root = render(tmp_path, source="zip", name="class")  # startproject takes it

    result, lines = run(["bin/setup"], root, user_env(home))

    assert result.returncode == 1 and result.stderr == "", result.stdout + result.stderr
    assert lines[-1] == ("bin/setup: the project's name 'class' is a Python keyword, so Python cannot import it: "
                         "run django-admin startproject again with another name")
    assert not [line for line in lines if line.startswith(STEPS[1:])]
