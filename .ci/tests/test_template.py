"""startproject with this template gives a complete project that runs and passes its own tests."""

import ast
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import pytest
from conftest import NAME, SEED_COMMAND, TEMPLATE, readme_command, render

# What every new project holds (a file the template adds later may be missing here, never the reverse).
EXPECTED = [
    ".gitignore", ".pre-commit-config.yaml", ".python-version", "Procfile", "Procfile.dev",
    "README.md", "app.json", "fabfile.py", "fabric.yaml", "bin/dev", "bin/setup", "bin/test", "conftest.py", "gunicorn.conf.py",
    "manage.py", "pyproject.toml", "requirements.txt", "reqs/common.in", "reqs/dev.in",
    "reqs/prod.in", "reqs/dev.txt", "reqs/prod.txt", "bin/lock", "bin/update-template", ".template.py", "app_template/apps.py", "app_template/urls.py", "app_template/views.py",
    "app_template/tests.py", "app_template/jinja2/app_name/index.html",
    f"{NAME}/__init__.py", f"{NAME}/asgi.py", f"{NAME}/wsgi.py", f"{NAME}/urls.py",
    f"{NAME}/settings/common.py", f"{NAME}/settings/dev.py", f"{NAME}/settings/prod.py",
    f"{NAME}/settings/test.py", f"{NAME}/libs/__init__.py", f"{NAME}/apps/__init__.py",
    f"{NAME}/apps/core/apps.py", f"{NAME}/templates/base.html", f"{NAME}/public/favicon.ico", f"{NAME}/templates/core/hello.html",
]


class PipelineTags(jinja2.ext.Extension):
    """The syntax of django-pipeline's Jinja2 tags (stylesheet 'name', javascript 'name'), which the
    project's templates use; the project's own tests render them with the real extension."""

    tags = {"stylesheet", "javascript"}

    def parse(self, parser):
        next(parser.stream)
        parser.parse_expression()
        return jinja2.nodes.Output([])


def is_jinja_template(path):
    return path.suffix == ".html" and ({"templates", "jinja2"} & set(path.parts))


def check_rendered(root):
    made_later = {".venv", "__pycache__", "db.sqlite3", "staticfiles", ".celery"}  # by bin/setup and use
    files = {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.is_file() and not made_later & set(p.relative_to(root).parts)
    }
    missing = [f for f in EXPECTED if f not in files]
    assert not missing, f"not in the new project: {missing}"
    assert not [f for f in files if "project_name" in f or f.endswith("-tpl")], "a template name was left"
    assert not [f for f in files if f.startswith(".ci/")], "template-only files leaked into the project"
    for name, path in files.items():
        if path.suffix == ".ico":  # an image, copied byte for byte
            assert path.read_bytes() == (TEMPLATE / name.replace(NAME, "project_name", 1)).read_bytes()
            continue
        text = path.read_text()
        if name.startswith("app_template/") and path.suffix == ".py":
            # startapp's own placeholders, and nothing else, survive (inside strings: still valid Python).
            leftover = text.replace("{{ app_name }}", "")
            assert "{{" not in leftover and "{%" not in leftover, f"{name}: template syntax left"
        elif is_jinja_template(path):
            assert "verbatim" not in text and "templatetag" not in text, f"{name}: Django's escape left"
            jinja2.Environment(extensions=[PipelineTags]).parse(text)  # intact Jinja2
        else:
            assert "{{" not in text and "{%" not in text, f"{name}: template syntax left"
        if path.suffix == ".py":
            ast.parse(text, name)
    assert f'"{NAME}.settings.dev"' in files["manage.py"].read_text()
    assert os.access(files["bin/dev"], os.X_OK) and os.access(files["manage.py"], os.X_OK)


@pytest.mark.parametrize("source", ["folder", "zip"])
@pytest.mark.parametrize("command", ["seed", "readme"])
def test_startproject_gives_a_complete_project(tmp_path, command, source):
    root = render(tmp_path, SEED_COMMAND if command == "seed" else readme_command(), source)

    check_rendered(root)


def test_readme_command_is_the_one_rendered(project):
    check_rendered(project.path)


def test_new_project_passes_its_own_tests(project):
    # README: the test command, in a clean shell (the walk in test_first_contact.py does it from scratch).
    clean = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin"}
    result = subprocess.run(["bin/test", "-q"], cwd=project.path, env=clean, capture_output=True, text=True)

    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_new_project_is_clean_for_ruff(project):
    for args in (["check", "."], ["format", "--check", "."]):
        result = project.run(project.bin / "ruff", *args, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


MODEL = """from django.conf import settings
from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=200)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    price = models.DecimalField(max_digits=10, decimal_places=2, default=0)

    def __str__(self):
        return self.name
"""


def test_generated_code_passes_ruff_as_generated(project, tmp_path):
    """addapp's app and the first makemigrations, then ruff as the README and pre-commit run it
    (pre-commit names each file): an owner's first commit of a model passes unchanged."""
    copy = tmp_path / NAME  # the shared project stays as it is
    shutil.copytree(project.path, copy, ignore=shutil.ignore_patterns(".venv", ".celery", "staticfiles"))
    python = str(project.bin / "python")
    subprocess.run([python, "manage.py", "addapp", "shop"], cwd=copy, env=project.env(), check=True)
    (copy / NAME / "apps/shop/models.py").write_text(MODEL)
    subprocess.run([python, "manage.py", "makemigrations", "shop"], cwd=copy, env=project.env(), check=True)
    made = [p.relative_to(copy) for p in (copy / NAME / "apps/shop").rglob("*.py")]
    assert Path(NAME, "apps/shop/migrations/0001_initial.py") in made

    for args in (["check", "."], ["format", "--check", "."], ["check", *made], ["format", "--check", *made]):
        result = subprocess.run([project.bin / "ruff", *args], cwd=copy, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_new_project_has_no_missing_migrations(project):
    result = project.manage("makemigrations", "--check", "--dry-run", check=False)

    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_check_is_clean_under_prod(project, postgres):
    env = {
        "DJANGO_SETTINGS_MODULE": f"{NAME}.settings.prod",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DATABASE_URL": postgres.url,
        "DATABASE_SSL_REQUIRE": "false",
        "ALLOWED_HOSTS": "mysite.herokuapp.com",
    }
    result = project.manage("check", "--deploy", "--fail-level", "WARNING", env=env, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize("python", ["python3.12"])
def test_new_project_works_on_other_python(tmp_path, python):
    root = render(tmp_path, readme_command())
    result = subprocess.run(
        ["bin/test", "-q"], cwd=root, env={**os.environ, "PYTHON": python, "PYENV_VERSION": python.removeprefix("python")},
        capture_output=True, text=True,
    )

    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert Path(root, ".venv/bin", python).exists()


# Issue 21: what a new project's owner inherits, in lines (the figures are printed in CI's log).
# The goal is libs/ 700 and 2,500 in all; these limits are the figures reached so far (a ratchet:
# lower them with each cut), so the project cannot grow unnoticed while cuts bring it to the goal.
LIBS_GOAL, PYTHON_GOAL = 700, 2500
LIBS_LIMIT, PYTHON_LIMIT = 1371, 3540


def python_lines(folder):
    """Lines of the *.py files under `folder`, outside tests/, migrations/ and .venv/."""
    skip = {"tests", "migrations", ".venv"}
    files = [p for p in folder.rglob("*.py") if not skip & set(p.relative_to(folder).parts)]
    return sum(len(p.read_text().splitlines()) for p in files)


def test_a_new_project_inherits_few_lines(tmp_path, record_property):
    path = render(tmp_path)
    libs, python = python_lines(path / NAME / "libs"), python_lines(path)
    # Printed at the end of the run by conftest.py (a pytest-xdist worker's own output is not shown).
    record_property("summary", f"size: {NAME}/libs/ {libs} lines (limit {LIBS_LIMIT}, goal {LIBS_GOAL}); "
                               f"Python outside tests {python} lines (limit {PYTHON_LIMIT}, goal {PYTHON_GOAL})")

    assert libs <= LIBS_LIMIT and python <= PYTHON_LIMIT
