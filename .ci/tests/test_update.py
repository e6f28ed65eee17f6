"""bin/update-template as an owner runs it: a project rendered from a GitHub-style archive of this
template (v1), then v2 built here as a commit on top, merged in by the command in a clean shell.
One project is rendered and set up for the module; each test works on its own copy."""

import functools
import http.server
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import NAME, TEMPLATE, readme_command, template_files

STOCK_PATH = "/usr/local/bin:/usr/bin:/bin"
COMMON = f"{NAME}/settings/common.py"
GIT = ["git", "-c", "user.name=Owner", "-c", "user.email=owner@example.com"]


def git(cwd, *args):
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


class Template:
    """A git repository of the template as it is in this checkout (v1), for commits on top."""

    def __init__(self, path):
        self.path = path
        for name in template_files():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TEMPLATE / name, path / name)
        git(path, "init", "--quiet", "--initial-branch=main")
        self.v1 = self.commit("v1")

    def commit(self, message):
        git(self.path, "add", "--all")
        git(self.path, "commit", "--quiet", "--allow-empty", "-m", message)
        return git(self.path, "rev-parse", "HEAD").strip()

    def edit(self, name, old, new):
        path = self.path / name
        text = path.read_text()
        assert old in text, f"{name} has no {old!r}"
        path.write_text(text.replace(old, new, 1))

    def archive(self, dest, commit="HEAD"):
        """What GitHub serves for .../archive/<ref>.zip: git archive, export-subst applied."""
        git(self.path, "archive", "--format=zip", "--prefix=djeroku-main/", f"--output={dest}",
            commit)
        return dest

    def branch(self, name, start="main"):
        git(self.path, "checkout", "--quiet", "-B", name, start)


def owner_env(home):
    return {"HOME": str(home), "PATH": STOCK_PATH, "LANG": "C.UTF-8"}


def run(project, command, home):
    """A line the owner types in the project's folder, in a clean shell."""
    return subprocess.run(["bash", "-c", command], cwd=project, env=owner_env(home),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def update(project, home, *args):
    return run(project, shlex.join(["bin/update-template", *map(str, args)]), home)


def record(project):
    return dict(re.findall(r'^([A-Z_]+) = "(.*)"$', (project / ".template.py").read_text(), re.M))


def status(project):
    return git(project, "status", "--porcelain")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """v1 of the template, a project made from its zip as the guide says, committed, set up."""
    root = tmp_path_factory.mktemp("update")
    home = root / "home"
    home.mkdir()
    (root / "template").mkdir()
    template = Template(root / "template")
    zip_v1 = template.archive(root / "djeroku-v1.zip")
    django_admin = Path(sys.executable).with_name("django-admin")
    args = shlex.split(readme_command().format(template=zip_v1, name=NAME))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    subprocess.run([str(django_admin), *args[1:]], cwd=root, check=True, env=env)
    project = root / NAME
    git(project, "init", "--quiet")
    git(project, "add", "--all")
    git(project, "commit", "--quiet", "-m", "New project")
    result = run(project, "bin/setup", home)
    assert result.returncode == 0, result.stdout
    return {"root": root, "home": home, "template": template, "zip_v1": zip_v1, "project": project}


@pytest.fixture
def project(world, tmp_path):
    """A copy of the shared project (its .venv hard-linked, as nothing here installs into it)."""
    dest = tmp_path / NAME
    shutil.copytree(world["project"], dest, symlinks=True, ignore=shutil.ignore_patterns(".venv"))
    subprocess.run(["cp", "-al", world["project"] / ".venv", dest / ".venv"], check=True)
    return dest


@pytest.fixture
def template(world):
    template = world["template"]
    template.branch(f"test-{random.randrange(10**9)}", template.v1)
    return template


def v2_with_changes(template):
    """v2: another line of common.py, a file added, files dropped and changed, the command too."""
    template.edit("project_name/settings/common.py-tpl", 'TIME_ZONE = "UTC"',
                  'TIME_ZONE = "UTC"  # v2: every timestamp in UTC')
    (template.path / "etc" / "added-in-v2.txt").write_text("added in v2\n")
    (template.path / "etc" / "conf.d" / "scheduler.conf").unlink()
    (template.path / "etc" / "nginx.conf").unlink()
    with open(template.path / "etc" / "conf.d" / "nginx-server.conf", "a") as program:
        program.write("# v2 changed this file\n")
    with open(template.path / "bin" / "update-template", "a") as command:
        command.write("# v2 of this command\n")
    return template.commit("v2")


def readme_block():
    """The owner's README's command, "Updating from the template", with {source} for the URL."""
    text = (TEMPLATE / "README.md").read_text()
    section = text.split("\n## Updating from the template\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"^```sh\n(.*?)^```$", section, re.M | re.S)
    url = "https://github.com/djeroku/djeroku/archive/main.zip"
    assert url in block, block
    return block.replace(url, "{source}")


def test_an_update_brings_the_templates_changes_and_keeps_the_owners(world, template, project):
    home = world["home"]
    key = re.search(r'^SECRET_KEY = "(.*)"$', (project / f"{NAME}/settings/dev.py").read_text(),
                    re.M).group(1)
    # The owner's changes: a setting, a deleted file, a new app (as the README adds one).
    with open(project / COMMON, "a") as common:
        common.write("\nOWNER_SETTING = 42\n")
    (project / "etc" / "conf.d" / "nginx-server.conf").unlink()
    with open(project / "etc" / "nginx.conf", "a") as nginx:
        nginx.write("# the owner's nginx line\n")
    result = run(project, ".venv/bin/python manage.py addapp blog", home)
    assert result.returncode == 0, result.stdout
    git(project, "add", "--all")
    git(project, "commit", "--quiet", "-m", "The owner's work")

    v2 = v2_with_changes(template)
    zip_v2 = template.archive(world["root"] / f"djeroku-{v2}.zip")
    result = run(project, readme_block().format(source=shlex.quote(str(zip_v2))), home)
    assert result.returncode == 0, result.stdout
    for line in ("updated    " + COMMON, "added      etc/added-in-v2.txt",
                 "deleted    etc/conf.d/scheduler.conf", "kept       etc/nginx.conf",
                 "kept out   etc/conf.d/nginx-server.conf", "updated    bin/update-template", "bin/test"):
        assert line in result.stdout, result.stdout

    common = (project / COMMON).read_text()
    assert "OWNER_SETTING = 42" in common and "v2: every timestamp in UTC" in common
    assert "apps.blog" in common and (project / NAME / "apps" / "blog" / "views.py").is_file()
    assert (project / "etc" / "added-in-v2.txt").read_text() == "added in v2\n"
    assert not (project / "etc" / "conf.d" / "scheduler.conf").exists()
    assert not (project / "etc" / "conf.d" / "nginx-server.conf").exists(), "the owner's deletion was undone"
    assert "the owner's nginx line" in (project / "etc" / "nginx.conf").read_text()
    assert "# v2 of this command" in (project / "bin" / "update-template").read_text()
    assert key in (project / f"{NAME}/settings/dev.py").read_text()
    assert record(project)["COMMIT"] == v2 and record(project)["SOURCE"] == str(zip_v2)
    assert not git(project, "ls-files", "--unmerged")

    result = run(project, "bin/test -q -x -p no:cacheprovider", home)
    assert result.returncode == 0, result.stdout[-5000:]
    git(project, "commit", "--quiet", "-m", "Update from the template")
    result = update(project, home, zip_v2)
    assert result.returncode == 0 and "up to date" in result.stdout, result.stdout
    assert status(project) == ""


def test_a_line_both_changed_is_a_git_conflict(world, template, project):
    template.edit("project_name/settings/common.py-tpl", 'TIME_ZONE = "UTC"',
                  'TIME_ZONE = "Europe/Paris"')
    v2 = template.commit("v2")
    common = (project / COMMON).read_text()
    (project / COMMON).write_text(common.replace('TIME_ZONE = "UTC"', 'TIME_ZONE = "Asia/Tokyo"'))
    git(project, "commit", "--quiet", "-am", "Tokyo")

    result = update(project, world["home"], template.archive(world["root"] / f"{v2}.zip"))
    assert result.returncode != 0 and COMMON in result.stdout, result.stdout
    text = (project / COMMON).read_text()
    assert "<<<<<<<" in text and "Asia/Tokyo" in text and "Europe/Paris" in text
    assert {line.split("\t")[1] for line in
            git(project, "ls-files", "--unmerged").splitlines()} == {COMMON}
    assert f"UU {COMMON}" in status(project)
    # The committed record is the old version until the owner commits the resolution.
    assert world["template"].v1 in git(project, "show", "HEAD:.template.py")
    again = update(project, world["home"], world["zip_v1"])
    assert again.returncode != 0 and len(again.stdout.splitlines()) == 1, again.stdout
    assert "uncommitted changes" in again.stdout


def test_a_dirty_tree_is_refused(world, project):
    (project / "notes.txt").write_text("work in progress\n")
    before = status(project)
    result = update(project, world["home"], world["zip_v1"])
    assert result.returncode != 0 and len(result.stdout.splitlines()) == 1, result.stdout
    assert "uncommitted" in result.stdout and status(project) == before


class Archives(http.server.SimpleHTTPRequestHandler):
    """Files as a git host serves archives: named by Content-Disposition, the query ignored."""

    def end_headers(self):
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        self.send_header("Content-Disposition", f"attachment; filename=djeroku-{name}")
        super().end_headers()

    def log_message(self, *args):
        pass


def serve(handler):
    """An HTTP server on loopback, on a free port below the temporary range."""
    for _ in range(50):
        try:
            server = http.server.ThreadingHTTPServer(
                ("127.0.0.1", random.randrange(20000, 32000)), handler)
            break
        except OSError:
            continue
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server for archives: what a git host serves, from a folder."""
    root = tmp_path / "www"
    root.mkdir()
    server = serve(functools.partial(Archives, directory=str(root)))
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_moving_url_updates_from_the_pinned_commit(world, template, project, http_root):
    """The project was made from .../archive/main.zip, which now holds v2: the record's commit
    gives the base's own archive URL."""
    www, base_url = http_root
    archive = www / "djeroku" / "djeroku" / "archive"
    archive.mkdir(parents=True)
    main_url = f"{base_url}/djeroku/djeroku/archive/main.zip"
    text = (project / ".template.py").read_text()
    (project / ".template.py").write_text(text.replace(str(world["zip_v1"]), main_url))
    git(project, "commit", "--quiet", "-am", "Made from the URL")
    template.archive(archive / f"{template.v1}.zip", template.v1)
    v2 = v2_with_changes(template)
    template.archive(archive / "main.zip", v2)

    # A private archive's token (GitHub's ?token=...) is used, never recorded or printed.
    result = update(project, world["home"], main_url + "?token=s3cret-token")
    assert result.returncode == 0, result.stdout
    assert (project / "etc" / "added-in-v2.txt").exists()
    assert record(project)["COMMIT"] == v2
    assert record(project)["SOURCE"] == main_url
    assert "s3cret" not in result.stdout + (project / ".template.py").read_text()

    # Without the pinned archive, one line asks for --from; nothing changes.
    git(project, "reset", "--quiet", "--hard")
    (archive / f"{template.v1}.zip").unlink()
    result = update(project, world["home"], main_url)
    assert result.returncode != 0 and "--from" in result.stdout, result.stdout
    assert len(result.stdout.splitlines()) == 1 and status(project) == ""


def test_a_moving_zip_asks_for_from_and_from_works(world, template, project):
    """The zip the project was made from now holds v2: never its own base."""
    moving = world["root"] / f"moving-{random.randrange(10**9)}.zip"
    shutil.copy(world["zip_v1"], moving)
    text = (project / ".template.py").read_text()
    (project / ".template.py").write_text(text.replace(str(world["zip_v1"]), str(moving)))
    git(project, "commit", "--quiet", "-am", "Made from the moving zip")
    v2_with_changes(template)
    template.archive(moving)

    result = update(project, world["home"], moving)
    assert result.returncode != 0 and "--from" in result.stdout.splitlines()[-1], result.stdout
    assert status(project) == ""

    result = update(project, world["home"], moving, "--from", world["zip_v1"])
    assert result.returncode == 0, result.stdout
    assert (project / "etc" / "added-in-v2.txt").exists()


def test_the_folder_form_and_a_moved_project(world, template, project, tmp_path):
    """SOURCE a checkout of the template; the project moved to another folder since startproject;
    the zip it was made from gone (the checkout holds the pinned commit)."""
    v2 = v2_with_changes(template)
    moved = tmp_path / "elsewhere" / "renamed-checkout"
    moved.parent.mkdir()
    shutil.move(project, moved)
    text = (moved / ".template.py").read_text()
    (moved / ".template.py").write_text(text.replace(str(world["zip_v1"]), "/gone/djeroku.zip"))
    git(moved, "commit", "--quiet", "-am", "The zip is gone")

    result = update(moved, world["home"], template.path)
    assert result.returncode == 0, result.stdout
    assert (moved / "etc" / "added-in-v2.txt").exists()
    assert record(moved)["COMMIT"] == v2 and record(moved)["SOURCE"] == str(template.path)


def test_a_change_to_common_in_makes_the_locks_again(world, template, project):
    template.edit("reqs/common.in", "Django~=5.2.19\n",
                  "Django~=5.2.19\n# Dates (also botocore's).\npython-dateutil~=2.9\n")
    v2 = template.commit("v2")
    before = (project / "reqs" / "prod.txt").read_text()
    result = update(project, world["home"], template.archive(world["root"] / f"{v2}.zip"))
    assert result.returncode == 0, result.stdout
    assert "bin/lock" in result.stdout
    after = (project / "reqs" / "prod.txt").read_text()
    assert after != before
    entry = re.search(r"^python-dateutil==.*?(?=^\S)", after, re.M | re.S).group()
    assert "-r reqs/common.in" in entry, entry
    assert "M  reqs/prod.txt" in status(project)


@pytest.mark.parametrize("case", ["not git", "not a template", "another template", "no record",
                                  "renamed package"])
def test_bad_input_is_one_line_and_changes_nothing(world, project, tmp_path, case):
    source = world["zip_v1"]
    if case == "not git":
        shutil.rmtree(project / ".git")
    elif case == "not a template":
        source = tmp_path / "nothing.zip"
        source.write_text("not a zip\n")
    elif case == "another template":
        source = tmp_path / "other"
        (source / "project_name").mkdir(parents=True)
        (source / "manage.py-tpl").write_text("# another template\n")
    elif case == "no record":
        git(project, "rm", "--quiet", ".template.py")
        git(project, "commit", "--quiet", "-m", "No record")
    elif case == "renamed package":
        git(project, "mv", NAME, "renamed")
        git(project, "commit", "--quiet", "-m", "Renamed")
    before = None if case == "not git" else status(project)
    result = update(project, world["home"], source)
    assert result.returncode != 0 and len(result.stdout.splitlines()) == 1, result.stdout
    assert "Traceback" not in result.stdout
    if before is not None:
        assert status(project) == before


def test_ctrl_c_leaves_the_tree_as_it_was(world, project):
    """Ctrl-C while the new version downloads: one line, nothing changed."""
    requested, release = threading.Event(), threading.Event()

    class Stalled(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.set()
            release.wait(60)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = serve(Stalled)
    url = f"http://127.0.0.1:{server.server_address[1]}/djeroku/archive/main.zip"
    try:
        proc = subprocess.Popen(["bin/update-template", url], cwd=project,
                                env=owner_env(world["home"]), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert requested.wait(60), proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        out = proc.communicate(timeout=60)[0]
    finally:
        release.set()
        server.shutdown()
    assert proc.returncode != 0 and out.splitlines() == [
        "bin/update-template: interrupted before the merge: nothing changed"], out
    assert status(project) == ""


def test_a_file_the_template_renamed_keeps_the_owners_edit(world, template, project):
    git(template.path, "mv", "etc/nginx.conf", "etc/nginx-site.conf")
    v2 = template.commit("v2: nginx.conf renamed")
    with open(project / "etc" / "nginx.conf", "a") as nginx:
        nginx.write("# the owner's nginx line\n")
    git(project, "commit", "--quiet", "-am", "The owner's nginx line")

    result = update(project, world["home"], template.archive(world["root"] / f"{v2}.zip"))
    assert result.returncode == 0, result.stdout
    assert not (project / "etc" / "nginx.conf").exists()
    assert "the owner's nginx line" in (project / "etc" / "nginx-site.conf").read_text()
