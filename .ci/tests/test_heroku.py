"""
`fab heroku_setup`, heroku_teardown, promote and rollback: the new project's real `fab` drives the
real Heroku CLI (npm, pinned in .ci/heroku-cli/package.json) against the Platform API stand-in in
heroku_standin.py, which rejects any request that Heroku's published schema does not allow, and
answers for names someone else holds as Heroku does. Interactive runs get a terminal (pexpect).
`git push staging master` lands in a local bare repository whose hook builds a slug and a release
through the same API, as Heroku's build would.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pexpect
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
# pexpect forks each terminal's child from this process, which the stand-in's threads make
# multi-threaded; the child does little but exec fab, so Python's warning is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* use of forkpty:DeprecationWarning")
# POSTs that read: the CLI resolves add-ons and attachments, and filters apps, with them.
READS = {"add-on Resolution", "add-on-attachment Resolution", "filter-apps Apps"}

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
        "Content-Type": "application/json", "Accept": "application/vnd.heroku+json; version=3",
        "Authorization": "Bearer " + {api_key!r}}})
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
            hook.write_text(HOOK.format(
                python=sys.executable, api=standin.url, app=app, api_key=heroku_standin.API_KEY
            ))
            hook.chmod(0o755)
        self.env = {
            "PATH": f"{cli.parent}:{project.bin}:{os.environ['PATH']}",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "HEROKU_API_KEY": heroku_standin.API_KEY,
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
        """Run a command as from a script: no terminal (stdin is empty unless `input` is given)."""
        result = subprocess.run(
            [str(a) for a in args], cwd=self.path, env={**self.env, **(env or {})},
            capture_output=True, text=True, input=input if input is not None else "", timeout=timeout,
        )
        result.output = result.stdout + result.stderr
        return result

    def fab(self, *args, **kw):
        return self.run(self.fab_path, *args, **kw)

    def terminal(self, *args):
        """`fab ARGS` in a terminal of its own (a pty), as a user types it: pexpect drives it."""
        return pexpect.spawn(
            str(self.fab_path), [str(a) for a in args], cwd=str(self.path), env=self.env,
            encoding="utf-8", timeout=300, dimensions=(50, 200),
        )

    def writes(self):
        """The calls that changed something on Heroku since the last `standin.requests.clear()`."""
        return [
            f"{r['method']} {r['path']}" for r in self.standin.requests
            if r["method"] != "GET" and r.get("link") not in READS
        ]

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


ADDONS = [
    "heroku-postgresql:essential-0", "heroku-redis:mini", "memcachier:dev", "papertrail",
    "newrelic", "scheduler:standard", "mailgun:starter",
]


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


def finish(child):
    """Wait for a terminal's fab to end; its transcript, and its exit status on the child."""
    child.expect(pexpect.EOF)
    child.close()
    return child.before


def test_setup_rerun_push_promote_rollback_teardown(site):
    result = setup(site)

    assert result.returncode == 0, result.output
    assert_complete(site)
    assert "[1/" in result.stdout and "Adding heroku-redis:mini to shop-staging … done" in result.stdout
    assert "Creating pipeline shop with shop-staging as staging … done" in result.stdout
    for secret in secret_keys(site).values():
        assert secret not in result.output, "a SECRET_KEY was printed"
    assert site.git("log", "--format=%s") == "New project from the Djeroku template"
    assert "waiting for the first deploy" in result.stdout  # no process types before a deploy
    # Essential plans have no pooling of Heroku's: one line says what to do instead.
    assert (
        "Connection pooling on shop-staging … skipped, heroku-postgresql:essential-0 has none: move "
        'to a Standard plan, or run PgBouncer on each dyno (README: "More web dynos than connections")'
    ) in result.stdout
    assert not [r for r in site.standin.requests if r["path"].endswith("/connection-pooling")]
    assert "https://shop-" in result.stdout and "git remote staging" in result.stdout  # summary
    # Before anything is made, the plan: apps, region, each add-on with its plan, config by name.
    plan = result.stdout.split("[1/")[0]
    assert "region eu" in plan and "shop-staging (git remote staging): new" in plan
    assert all(addon in plan for addon in ADDONS) and "SECRET_KEY" in plan
    # Names first: both apps and the pipeline exist before the first add-on is asked for.
    links = [r.get("link") for r in site.standin.requests]
    first_addon = links.index("add-on Create")
    assert links[:first_addon].count("app Create") == 2
    assert "pipeline-coupling Create" in links[:first_addon]
    # The pipeline came with --stage (without it the CLI prompts, and exits 130 with no terminal).
    couplings = [r for r in site.standin.requests if r["path"] == "/pipeline-couplings" and r["method"] == "POST"]
    assert [c["body"]["stage"] for c in couplings] == ["staging", "production"]

    # Run again: everything is skipped, nothing is written, no secret changes.
    secrets_before = secret_keys(site)
    site.standin.requests.clear()
    again = setup(site)

    assert again.returncode == 0, again.output
    assert_complete(site)
    assert secret_keys(site) == secrets_before
    assert again.stdout.count("skipped") >= 2 * (1 + len(ADDON_SERVICES) + 3) + 2
    assert site.writes() == []

    # Another name while the remotes point to shop's apps: refused before anything is made, as
    # it would leave shop's apps (and their bills) behind.
    site.standin.requests.clear()
    other = site.fab("heroku_setup", "--name=shop2", "--region=eu", "--yes")

    assert other.returncode == 1, other.output
    assert "The git remote staging points to shop-staging, not shop2-staging" in other.output
    assert "fab heroku_teardown --name=shop" in other.output
    assert site.writes() == [] and "shop2" not in site.platform.apps

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

    # Promote from a terminal: the diff is shown (it needs GitHub, refused here), asked, promoted.
    child = site.terminal("promote")  # the staging remote names the app
    child.expect(r"Promote shop-staging to production\? \[y/N\]: ")
    shown = child.before
    child.sendline("y")
    finish(child)

    assert child.exitstatus == 0, shown + child.before
    assert "connected to GitHub" in shown
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

    # Teardown: never unasked, and only after the name is typed.
    site.standin.requests.clear()
    unasked = site.fab("heroku_teardown", f"--name={NAME}")
    nameless = site.fab("heroku_teardown", "--yes")
    child = site.terminal("heroku_teardown", f"--name={NAME}")
    child.expect("Type shop to destroy them: ")
    listed = child.before
    child.sendline("shop-staging")
    finish(child)

    assert unasked.returncode == 1 and "pass --yes" in unasked.output, unasked.output
    assert nameless.returncode == 1 and "--yes needs --name" in nameless.output
    assert child.exitstatus == 1 and "nothing was removed" in child.before
    assert "shop-staging and its 7 add-on(s)" in listed and "pipeline shop" in listed
    assert site.writes() == [] and sorted(site.platform.apps) == sorted(APPS.values())

    child = site.terminal("heroku_teardown", f"--name={NAME}")
    child.expect("Type shop to destroy them: ")
    child.sendline("shop")
    removed = finish(child)

    assert child.exitstatus == 0, removed
    assert "Removed: shop-staging and its 7 add-on(s); shop and its 7 add-on(s); pipeline shop" in removed
    assert "git remote staging; git remote production" in removed
    platform = site.platform
    assert platform.apps == {} and platform.addons == {} and platform.pipelines == {}
    assert platform.couplings == {}
    assert site.git("remote") == ""

    again = site.fab("heroku_teardown", f"--name={NAME}", "--yes")

    assert again.returncode == 0, again.output
    assert "Nothing to remove. Not there: shop-staging (no such app); shop (no such app); pipeline shop" in again.stdout


def test_pooling_is_attached_where_the_plan_has_it(site):
    # The owner picks a Standard plan in the fabfile's ADDONS, as the README says.
    fabfile = site.path / "fabfile.py"
    fabfile.write_text(fabfile.read_text().replace("postgresql:essential-0", "postgresql:standard-0"))

    result = setup(site)

    assert result.returncode == 0, result.output
    for app_name in APPS.values():
        assert f"Connection pooling on {app_name} … done" in result.stdout, result.stdout
        app = site.platform.app(app_name)
        assert app["_config"]["DATABASE_CONNECTION_POOL_URL"].startswith("postgres://")
        pools = [a for a in site.platform.attachments.values()
                 if a["app"]["id"] == app["id"] and a["name"] == "DATABASE_CONNECTION_POOL"]
        assert len(pools) == 1 and pools[0]["addon"]["plan"]["name"] == "heroku-postgresql:standard-0"

    site.standin.requests.clear()
    again = setup(site)

    assert again.returncode == 0, again.output
    assert "Connection pooling on shop … skipped, it is on" in again.stdout
    assert site.writes() == []


def process_arguments():
    """Every process's command line on this machine, as anyone on it can read them."""
    return subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout


def test_no_secret_in_any_process_arguments(site):
    aws_secret = "marker-aws-secret-0b9f4c"
    seen, done = [], threading.Event()

    def sample():
        while not done.is_set():
            seen.append(process_arguments())

    site.standin.hold("config-var Update")  # each app's config waits: look at the machine then
    child = site.terminal("heroku_setup", f"--name={NAME}", "--region=eu")
    child.expect(r"AWS access key id for S3 \(empty for none\): ")
    child.sendline("AKIAMARKER")
    child.expect("AWS secret access key: ")
    child.sendline(aws_secret)  # asked: an option would itself show in `ps`
    child.expect("S3 bucket name: ")
    child.sendline("shop-media")
    child.expect(r"Create what is missing\? \[y/N\]: ")
    child.sendline("y")
    sampler = threading.Thread(target=sample)
    sampler.start()
    held = []
    for _app in APPS.values():
        gate = site.standin.waiting.get(timeout=300)
        held.append(process_arguments())
        gate.set()
    out = finish(child)
    done.set()
    sampler.join()

    assert child.exitstatus == 0, out
    assert all("heroku_setup" in ps for ps in held)  # fab was running while its config went
    values = [*secret_keys(site).values(), aws_secret]
    for app in APPS.values():
        assert site.platform.app(app)["_config"]["AWS_SECRET_ACCESS_KEY"] == aws_secret
    for ps in held + seen:
        assert not [v for v in values if v in ps], "a secret is on a command line"
    assert not [v for v in values if v in out]


@pytest.mark.parametrize("link", ["account Info", "add-on Create"])
def test_ctrl_c_stops_at_once_and_says_how_to_go_on(site, link):
    site.standin.hold(link)  # the CLI waits for Heroku there: auth:whoami, the first add-on
    child = site.terminal("heroku_setup", f"--name={NAME}", "--region=eu", "--yes")
    gate = site.standin.waiting.get(timeout=300)
    child.sendintr()  # Ctrl-C: the terminal sends SIGINT to fab's process group
    out = finish(child)
    gate.set()

    assert child.exitstatus == 130, out
    said = [ln for ln in out.replace("^C", "").splitlines() if ln.strip()]
    assert said[-1] == (
        "Stopped (Ctrl-C). To go on, run `fab heroku_setup --name=shop --region=eu` "
        "(it skips what is done)."
    ), out
    if link == "add-on Create":
        assert said[-2].endswith("] Adding heroku-postgresql:essential-0 to shop-staging … "), out
    else:
        assert site.platform.apps == {}
    site.standin.hold(None)
    resumed = setup(site)

    assert resumed.returncode == 0, resumed.output
    assert_complete(site)


def test_teardown_keeps_a_pipeline_that_holds_another_app(site):
    assert setup(site).returncode == 0
    for added_by_hand in (
        ["apps:create", "shop-review", "--region", "eu"],
        ["pipelines:add", NAME, "--app", "shop-review", "--stage", "development"],
    ):
        assert site.run("heroku", *added_by_hand).returncode == 0

    removed = site.fab("heroku_teardown", f"--name={NAME}", "--yes")

    assert removed.returncode == 0, removed.output
    assert "Not there: pipeline shop (it holds shop-review: kept)" in removed.stdout
    assert sorted(site.platform.apps) == ["shop-review"]
    (pipeline,) = site.platform.pipelines.values()
    (coupling,) = site.platform.couplings.values()
    assert pipeline["name"] == NAME and coupling["stage"] == "development"


@pytest.mark.parametrize(
    "given, says",
    [
        (["--aws-access-key-id=AKIAEXAMPLE", "--aws-storage-bucket-name=shop-media"],
         "--aws-secret-access-key missing"),
        (["--aws-secret-access-key=marker-secret"],
         "--aws-access-key-id and --aws-storage-bucket-name missing"),
    ],
)
def test_half_given_aws_options_are_refused(site, given, says):
    result = setup(site, *given)

    assert result.returncode == 1, result.output
    assert says in result.output and "Traceback" not in result.output
    assert site.standin.requests == []


@pytest.mark.parametrize(
    "task", [["rollback"], ["backup"], ["logs"], ["promote", "--yes"], ["manage", "--command=check"]]
)
def test_a_missing_remote_is_named_with_the_option_to_pass(site, task):
    result = site.fab(*task)

    assert result.returncode == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert "no git remote staging" in line and "pass --app=APP" in line
    assert site.standin.requests == []


def test_failure_mid_way_stops_and_a_rerun_finishes(site):
    site.platform.fail_addons.add("memcachier")

    failed = setup(site)

    assert failed.returncode == 1, failed.output
    assert "Adding memcachier:dev to shop-staging … FAILED" in failed.stdout
    assert failed.output.count("could not be provisioned") == 1  # the CLI's message, once
    assert "Failed: Adding memcachier:dev to shop-staging" in failed.stdout  # named in the summary
    assert "run `fab heroku_setup` again" in failed.output
    assert services(site, APPS["staging"]) == ["heroku-postgresql", "heroku-redis"]
    assert services(site, APPS["production"]) == []  # both names are ours; nothing paid on it yet

    site.platform.fail_addons.clear()
    resumed = setup(site)

    assert resumed.returncode == 0, resumed.output
    assert "Creating shop-staging (git remote staging) … skipped" in resumed.stdout
    assert "Adding heroku-postgresql:essential-0 to shop-staging … skipped" in resumed.stdout
    assert "Adding memcachier:dev to shop-staging … done" in resumed.stdout
    assert_complete(site)


def test_interactive_run_that_went_on_past_failures_names_them_and_exits_1(site):
    site.platform.fail_addons.add("memcachier")
    child = site.terminal("heroku_setup", f"--name={NAME}", "--region=eu")
    child.expect(r"AWS access key id for S3 \(empty for none\): ")
    child.sendline("")
    child.expect(r"Create what is missing\? \[y/N\]: ")
    child.sendline("y")
    for app in APPS.values():
        child.expect(f"Adding memcachier:dev to {app} … FAILED")
        child.expect(r"Continue with the next step\? \(no: stop here\) \[y/N\]: ")
        child.sendline("y")
    out = finish(child)

    assert child.exitstatus == 1, out
    assert "Traceback" not in out
    assert "Failed: Adding memcachier:dev to shop-staging; Adding memcachier:dev to shop" in out
    for app in APPS.values():
        assert services(site, app) == sorted(set(ADDON_SERVICES) - {"memcachier"})


def test_a_name_someone_else_can_be_seen_to_hold_stops_before_anything_is_made(site):
    site.platform.others[NAME] = 403  # reading it says "You do not have access"

    result = setup(site)

    assert result.returncode == 1, result.output
    assert "Nothing was created" in result.output
    assert "The app name shop belongs to someone else" in result.output
    assert "--name=ANOTHER" in result.output
    assert site.writes() == [] and site.platform.apps == {}
    assert not (site.path / ".git").exists()


def test_a_name_taken_unseen_costs_nothing(site):
    site.platform.others[NAME] = 404  # reading it says nothing; creating it is refused

    result = setup(site)

    assert result.returncode == 1, result.output
    assert "Creating shop (git remote production) … FAILED" in result.stdout
    assert result.output.count("The app name shop belongs to someone else") == 1
    assert "Nothing paid was made, and this run created nothing on Heroku" in result.output
    assert site.platform.apps == {} and site.platform.addons == {}


def test_a_taken_staging_name_lists_what_was_made_and_teardown_removes_it(site):
    site.platform.others[APPS["staging"]] = 404
    # From a terminal, where the run would ask to go on after other failures: not after this.
    child = site.terminal("heroku_setup", f"--name={NAME}", "--region=eu")
    child.expect(r"AWS access key id for S3 \(empty for none\): ")
    child.sendline("")
    child.expect(r"Create what is missing\? \[y/N\]: ")
    child.sendline("y")
    out = finish(child)

    assert child.exitstatus == 1, out
    assert "Traceback" not in out and "Continue with the next step" not in out
    assert "Creating shop-staging (git remote staging) … FAILED" in out
    assert "The app name shop-staging belongs to someone else" in out and "--name=ANOTHER" in out
    assert "This run created:\r\n  shop (git remote production)" in out
    assert "To remove it: fab heroku_teardown --name=shop" in out
    assert sorted(site.platform.apps) == [NAME] and site.platform.addons == {}

    # A run with another name does not leave shop behind unsaid: the remote names it.
    other = site.fab("heroku_setup", "--name=shop2", "--region=eu", "--yes")

    assert other.returncode == 1 and "The git remote production points to shop" in other.output
    assert "shop2" not in site.platform.apps

    removed = site.fab("heroku_teardown", f"--name={NAME}", "--yes")

    assert removed.returncode == 0, removed.output
    assert "Removed: shop and its 0 add-on(s); git remote production" in removed.stdout
    assert "Not there: shop-staging (no such app); pipeline shop; git remote staging" in removed.stdout
    assert site.platform.apps == {} and site.git("remote") == ""


def test_without_a_terminal_nothing_runs_unless_yes(site):
    for task in (["heroku_setup", "--name=shop"], ["promote"], ["heroku_teardown", "--name=shop"]):
        result = site.fab(*task)

        assert result.returncode == 1, result.output
        (line,) = result.output.strip().splitlines()  # one line, no traceback
        assert "there is no terminal: pass --yes" in line
    assert site.standin.requests == []


def test_interactive_asks_again_at_once_hides_the_secret_and_confirms_first(site):
    child = site.terminal("heroku_setup")
    child.expect(r"App name \(NAME-staging and NAME are made\) \[mysite\]: ")
    child.sendline("Shop_Site")
    child.expect("may only hold lowercase letters, digits and dashes")
    child.expect(r"App name \(NAME-staging and NAME are made\) \[mysite\]: ")  # at once
    child.sendline(NAME)
    child.expect(r"Heroku team \(empty for your personal account\): ")
    child.sendline("")
    child.expect(r"Region \(us, eu\) \[us\]: ")
    child.sendline("mars")
    child.expect("region 'mars' is not one of us, eu")
    child.expect(r"Region \(us, eu\) \[us\]: ")
    child.sendline("eu")
    child.expect(r"AWS access key id for S3 \(empty for none\): ")
    child.sendline("AKIAEXAMPLE")
    child.expect("AWS secret access key: ")
    child.sendline("the-aws-secret-value")
    child.expect("S3 bucket name: ")
    child.sendline("shop-media")
    child.expect(r"Create what is missing\? \[y/N\]: ")
    plan = child.before
    child.sendline("n")
    out = finish(child)

    assert child.exitstatus == 1 and "Nothing was created" in out
    assert "the-aws-secret-value" not in plan + out, "the secret was echoed"
    assert "region eu" in plan and "shop-staging (git remote staging): new" in plan
    assert all(addon in plan for addon in ADDONS)
    assert "SECRET_KEY" in plan and "AWS_SECRET_ACCESS_KEY" in plan
    assert site.writes() == [] and not (site.path / ".git").exists()


def test_end_of_input_at_a_prompt_stops_cleanly(site):
    child = site.terminal("heroku_setup")
    child.expect(r"App name .*: ")
    child.sendeof()
    out = finish(child)

    assert child.exitstatus == 1 and "No answer" in out and "Traceback" not in out
    assert site.standin.requests == []


def test_no_git_identity_says_how_to_set_it_and_leaves_no_repository(site, tmp_path):
    home = tmp_path / "new-machine"
    home.mkdir()

    result = setup(site, env={"HOME": str(home)})

    assert result.returncode == 1, result.output
    assert "Traceback" not in result.output
    assert "Please tell me who you are" in result.output  # git's own message
    assert 'git config --global user.email "you@example.com"' in result.output
    assert 'git config --global user.name "Your Name"' in result.output
    assert not (site.path / ".git").exists()
    assert site.writes() == []


@pytest.mark.parametrize("task", ["rollback", "backup", "logs"])
def test_tasks_pass_the_cli_failure_on_and_say_it_once(site, task):
    result = site.fab(task, "--app=nosuchapp")

    assert result.returncode != 0, result.output
    assert result.output.count("Couldn't find that app") == 1, result.output
    assert "Traceback" not in result.output


def test_startproject_copies_app_json_as_it_is(project):
    # Not rendered (only .py and .html are): Heroku reads it byte for byte.
    assert (project.path / "app.json").read_bytes() == (TEMPLATE / "app.json").read_bytes()


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
