"""
`fab heroku_setup`, promote and rollback: the new project's real `fab` drives the real Heroku CLI
(npm, pinned in .ci/heroku-cli/package.json) against the Platform API stand-in in
heroku_standin.py, which rejects any request that Heroku's published schema does not allow.
`git push staging master` lands in a local bare repository whose hook builds a slug and a release
through the same API, as Heroku's build would.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import TEMPLATE

import heroku_standin

CLI_DIR = TEMPLATE / ".ci" / "heroku-cli"
# CI has shared/ beside the checkout; a worktree has it one level further up.
SCHEMA = next(
    p / "shared" / "heroku" / "platform-api-schema.json"
    for p in (TEMPLATE.parent, TEMPLATE.parent.parent, TEMPLATE.parent.parent.parent)
    if (p / "shared" / "heroku" / "platform-api-schema.json").exists()
)
NAME = "shop"
APPS = {"staging": f"{NAME}-staging", "production": NAME}
ADDON_SERVICES = [
    "heroku-postgresql", "heroku-redis", "memcachier", "papertrail", "newrelic", "scheduler", "mailgun",
]

# The Procfile has worker and scheduler (Celery); should a project drop them, the test's copy
# gets them back, so that scaling is always exercised (the fabfile reads the Procfile as it runs).
EXTRA_PROCFILE = {
    "worker": "worker: python manage.py celery worker --loglevel INFO",
    "scheduler": "scheduler: python manage.py celery beat --loglevel INFO",
}

HOOK = """#!{python}
# Heroku's build, as far as the API sees it: a slug with the Procfile's types, then a release.
import json, re, subprocess, sys, urllib.request
API = {api!r}
APP = {app!r}

def call(method, path, body):
    request = urllib.request.Request(API + path, json.dumps(body).encode(), method=method, headers={{
        "Content-Type": "application/json", "Accept": "application/vnd.heroku+json; version=3"}})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)

for line in sys.stdin:
    old, new, ref = line.split()
    if ref not in ("refs/heads/main", "refs/heads/master"):
        continue
    procfile = subprocess.run(["git", "show", new + ":Procfile"], capture_output=True, text=True).stdout
    types = dict(m.groups() for m in re.finditer(r"^([A-Za-z0-9_-]+):\\s*(.+)$", procfile, re.M))
    slug = call("POST", "/apps/" + APP + "/slugs", {{"process_types": types, "commit": new,
        "buildpack_provided_description": "Python"}})
    release = call("POST", "/apps/" + APP + "/releases", {{"slug": slug["id"],
        "description": "Deploy " + new[:8]}})
    print("Released v%d" % release["version"])
"""


@pytest.fixture(scope="session")
def heroku_cli():
    """The pinned CLI (.ci/run installs it; installed here too when missing)."""
    binary = CLI_DIR / "node_modules" / ".bin" / "heroku"
    if not binary.exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=CLI_DIR, check=True, timeout=900,
        )
    return binary


@pytest.fixture
def standin():
    server = heroku_standin.StandIn(SCHEMA).start()
    yield server
    server.close()


class Site:
    """A copy of the rendered project, its own git repo to be, with the CLI pointed at the stand-in."""

    def __init__(self, project, tmp_path, cli, standin):
        self.path = tmp_path / "site"
        shutil.copytree(
            project.path, self.path,
            ignore=shutil.ignore_patterns(".venv", ".git", "db.sqlite3", "__pycache__", ".pytest_cache"),
        )
        procfile = self.path / "Procfile"
        text = procfile.read_text()
        for kind, line in EXTRA_PROCFILE.items():
            if not any(ln.startswith(f"{kind}:") for ln in text.splitlines()):
                text += line + "\n"
        procfile.write_text(text)
        self.standin, self.fab_bin = standin, project.bin / "fab"
        self.home = tmp_path / "home"
        self.git_dir = tmp_path / "git"
        self.home.mkdir()
        self.git_dir.mkdir()
        (self.home / ".gitconfig").write_text(textwrap.dedent(f"""\
            [user]
                name = Test
                email = test@example.com
            [init]
                defaultBranch = master
            [url "{self.git_dir}/"]
                insteadOf = https://git.heroku.com/
            """))
        for app in APPS.values():
            bare = self.git_dir / f"{app}.git"
            subprocess.run(["git", "init", "--quiet", "--bare", bare], check=True)
            hook = bare / "hooks" / "post-receive"
            hook.write_text(HOOK.format(python=sys.executable, api=standin.url, app=app))
            hook.chmod(0o755)
        self.env = {
            "PATH": f"{cli.parent}:{project.bin}:{os.environ['PATH']}",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "HEROKU_API_KEY": "test-api-key",
            "HEROKU_HOST": standin.url,
            "HEROKU_PARTICLEBOARD_URL": standin.url,
            "HEROKU_DATA_HOST": "127.0.0.1",
            # Remotes as Heroku names them (else the CLI derives them from HEROKU_HOST); the
            # gitconfig above sends them to the bare repositories.
            "HEROKU_GIT_HOST": "git.heroku.com",
            "HEROKU_DISABLE_AUTOUPDATE": "1",
            "HEROKU_SKIP_NEW_VERSION_CHECK": "true",
            "DISABLE_TELEMETRY": "true",
            # Hosts the CLI calls directly (GitHub's side of pipelines:diff) reach a refusing
            # proxy on loopback, never the network.
            "HTTPS_PROXY": standin.url,
            "HTTP_PROXY": standin.url,
            "NO_PROXY": "127.0.0.1,localhost",
        }
        # `heroku run` attaches over TLS to the stand-in's rendezvous, whose certificate it trusts;
        # the "dyno" runs the command in this checkout with the app's config vars.
        self.env["NODE_EXTRA_CA_CERTS"] = str(standin.run_dynos(self.path, self.env["PATH"]))

    def run(self, *args, input=None, env=None, timeout=600):
        result = subprocess.run(
            [str(a) for a in args], cwd=self.path, env={**self.env, **(env or {})},
            capture_output=True, text=True, input=input, timeout=timeout,
        )
        result.output = result.stdout + result.stderr
        return result

    def fab(self, *args, **kw):
        return self.run(self.fab_path, *args, **kw)

    @property
    def fab_path(self):
        return self.fab_bin

    def git(self, *args):
        return self.run("git", *args).stdout.strip()

    @property
    def platform(self):
        return self.standin.platform


@pytest.fixture
def site(project, tmp_path, heroku_cli, standin):
    yield Site(project, tmp_path, heroku_cli, standin)
    assert not standin.rejected, "requests Heroku's schema does not allow:\n" + json.dumps(
        standin.rejected, indent=1
    )
    # The only hosts the CLI tried to reach past the stand-in: GitHub's side of pipelines:diff.
    assert set(standin.connects) <= {"kolkrabbi.heroku.com:443", "api.github.com:443"}, standin.connects


def setup(site, *extra, **kw):
    return site.fab("heroku_setup", f"--name={NAME}", "--region=eu", "--yes", *extra, **kw)


def services(site, app):
    return sorted(a["addon_service"]["name"] for a in site.platform.app_addons(site.platform.app(app)))


def assert_complete(site):
    """The state a finished heroku_setup leaves, whatever runs it took."""
    platform = site.platform
    assert sorted(platform.apps) == sorted(APPS.values())
    secrets = set()
    for stage, app_name in APPS.items():
        app = platform.app(app_name)
        assert app["region"]["name"] == "eu"
        assert services(site, app_name) == sorted(ADDON_SERVICES)  # each add-on exactly once
        plans = {a["plan"]["name"] for a in platform.app_addons(app)}
        assert {"heroku-postgresql:essential-0", "heroku-redis:mini", "memcachier:dev"} <= plans
        config = app["_config"]
        assert config["DJANGO_SETTINGS_MODULE"] == "mysite.settings.prod"
        assert config["ALLOWED_HOSTS"] == app["web_url"].removeprefix("https://").rstrip("/")
        assert config["ALLOWED_HOSTS"].startswith(f"{app_name}-")  # Heroku's new hosts have a hash
        assert config["SENTRY_ENVIRONMENT"] == stage
        assert len(config["SECRET_KEY"]) >= 50
        secrets.add(config["SECRET_KEY"])
        assert app["_features"]["runtime-dyno-metadata"] is True
        assert app["_features"]["runtime-dyno-build-metadata"] is True  # HEROKU_BUILD_COMMIT
        database = next(a for a in platform.app_addons(app) if a["addon_service"]["name"] == "heroku-postgresql")
        assert platform.schedules[database["id"]] == [
            {"name": "DATABASE_URL", "hour": 2, "timezone": "UTC"}
        ]
        assert site.git("config", f"remote.{stage}.url") == (
            f"https://git.heroku.com/{app_name}.git"
        )
    assert len(secrets) == 2, "each app has its own SECRET_KEY"
    (pipeline,) = platform.pipelines.values()
    assert pipeline["name"] == NAME
    stages = {platform.app(c["app"]["id"])["name"]: c["stage"] for c in platform.couplings.values()}
    assert stages == {APPS["staging"]: "staging", APPS["production"]: "production"}


def secret_keys(site):
    return {name: app["_config"].get("SECRET_KEY") for name, app in site.platform.apps.items()}


def test_setup_rerun_push_promote_rollback(site):
    result = setup(site)

    assert result.returncode == 0, result.output
    assert_complete(site)
    assert "[1/" in result.stdout and "Adding heroku-redis:mini to shop-staging … done" in result.stdout
    assert "Creating pipeline shop with shop-staging as staging … done" in result.stdout
    for secret in secret_keys(site).values():
        assert secret not in result.output, "a SECRET_KEY was printed"
    assert site.git("log", "--format=%s") == "New project from the Djeroku template"
    assert "waiting for the first deploy" in result.stdout  # no process types before a deploy
    assert "https://shop-" in result.stdout and "git remote staging" in result.stdout  # summary
    # The pipeline came with --stage (without it the CLI prompts, and exits 130 with no terminal).
    couplings = [r for r in site.standin.requests if r["path"] == "/pipeline-couplings" and r["method"] == "POST"]
    assert [c["body"]["stage"] for c in couplings] == ["staging", "production"]

    # Run again: everything is skipped, nothing is made twice, no secret changes.
    secrets_before = secret_keys(site)
    site.standin.requests.clear()
    again = setup(site)

    assert again.returncode == 0, again.output
    assert_complete(site)
    assert secret_keys(site) == secrets_before
    assert again.stdout.count("skipped") >= 2 * (1 + len(ADDON_SERVICES) + 1) + 2
    made = [r for r in site.standin.requests if r["method"] in ("POST", "PATCH")
            and r.get("link") in ("app Create", "add-on Create", "pipeline Create",
                                  "pipeline-coupling Create", "config-var Update")]
    assert made == [], made

    # Deploy staging the seed's way: the push lands in the (bare) git repository behind the remote.
    push = site.run("git", "push", "staging", "master")

    assert push.returncode == 0, push.output
    head = site.git("rev-parse", "HEAD")
    bare = subprocess.run(["git", "rev-parse", "master"], cwd=site.git_dir / "shop-staging.git",
                          capture_output=True, text=True).stdout.strip()
    assert bare == head
    staging = site.platform.app(APPS["staging"])
    assert staging["_releases"][-1]["description"] == f"Deploy {head[:8]}"

    # A one-off manage.py command runs in a dyno with staging's config vars (production settings).
    checked = site.fab("manage", "--command=check --deploy --fail-level WARNING")

    assert checked.returncode == 0, checked.output
    assert "System check identified no issues" in checked.output
    (run,) = site.platform.rendezvous.runs
    assert run["app"] == APPS["staging"] and run["command"].startswith("python manage.py check --deploy")
    assert site.fab("manage", "--command=nosuchcommand").returncode == 1  # its exit code, passed on

    # Promote: the diff is shown (it needs GitHub, which is refused here), then the promotion.
    promoted = site.fab("promote", input="y\n")  # the staging remote names the app

    assert promoted.returncode == 0, promoted.output
    assert "connected to GitHub" in promoted.stdout
    assert any("github" in h or "kolkrabbi" in h for h in site.standin.connects)
    (promotion,) = site.platform.promotions.values()
    assert promotion["source"]["app"]["id"] == staging["id"]
    production = site.platform.app(APPS["production"])
    assert [t["app"]["id"] for t in promotion["_targets"]] == [production["id"]]
    assert production["_releases"][-1]["slug"] == staging["_releases"][-1]["slug"]

    # After the first deploy the process types exist: a re-run scales them (scheduler exactly 1).
    scaled = setup(site)

    assert scaled.returncode == 0, scaled.output
    for app in APPS.values():
        formation = {f["type"]: f["quantity"] for f in site.platform.formation(site.platform.app(app))}
        assert formation["worker"] == 1 and formation["scheduler"] == 1, formation
    assert secret_keys(site) == secrets_before

    # Roll production back to the release before the scaling/promotion.
    before = production["_releases"][-2]
    rolled = site.fab("rollback", f"--app={NAME}")

    assert rolled.returncode == 0, rolled.output
    rollback = site.standin.requests[-1]
    assert rollback["link"] == "release Rollback" and rollback["body"] == {"release": before["id"]}
    assert production["_releases"][-1]["description"] == f"Rollback to v{before['version']}"

    # An on-demand backup reaches Heroku Data's API.
    backup = site.fab("backup", f"--app={APPS['staging']}")

    assert backup.returncode == 0, backup.output
    database = next(a for a in site.platform.app_addons(staging)
                    if a["addon_service"]["name"] == "heroku-postgresql")
    assert len(site.platform.backups[database["id"]]) == 1


def test_failure_mid_way_stops_and_a_rerun_finishes(site):
    site.platform.fail_addons.add("memcachier")

    failed = setup(site)

    assert failed.returncode == 1, failed.output
    assert "Adding memcachier:dev to shop-staging … FAILED" in failed.stdout
    assert "could not be provisioned" in failed.stdout  # the CLI's message, shown
    assert "Stopped at step" in failed.output and "run `fab heroku_setup` again" in failed.output
    assert services(site, APPS["staging"]) == ["heroku-postgresql", "heroku-redis"]
    assert APPS["production"] not in site.platform.apps

    site.platform.fail_addons.clear()
    resumed = setup(site)

    assert resumed.returncode == 0, resumed.output
    assert "Creating shop-staging (git remote staging) … skipped" in resumed.stdout
    assert "Adding heroku-postgresql:essential-0 to shop-staging … skipped" in resumed.stdout
    assert "Adding memcachier:dev to shop-staging … done" in resumed.stdout
    assert_complete(site)


@pytest.mark.parametrize(
    "name, says",
    [
        ("Shop_Site", "may only hold lowercase letters, digits and dashes"),
        ("9lives", "must start with a letter"),
        ("a-name-that-is-much-too-long", "'a-name-that-is-much-too-long-staging' is 36 characters"),
    ],
)
def test_bad_names_are_refused_before_any_call(site, name, says):
    result = site.fab("heroku_setup", f"--name={name}", "--yes")

    assert result.returncode == 1
    assert says in result.output
    assert site.standin.requests == []


def test_cli_missing_or_logged_out_says_how_to_fix(site):
    no_cli = site.run(site.fab_path, "heroku_setup", "--name=shop", "--yes",
                      env={"PATH": f"{site.fab_path.parent}:/usr/bin:/bin"})
    assert no_cli.returncode == 1 and "Heroku CLI is not installed" in no_cli.output

    logged_out = site.run(site.fab_path, "heroku_setup", "--name=shop", "--yes", env={"HEROKU_API_KEY": ""})
    assert logged_out.returncode == 1 and "heroku login" in logged_out.output, logged_out.output
    assert site.platform.apps == {}
