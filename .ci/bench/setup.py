"""A new user's first minutes: startproject -> bin/setup done -> first page, and bin/test on a fresh
project, for this template and for an older commit of it (default: the last whose bin/setup used pip),
with a cold package cache (a fresh HOME) and a warm one (the HOME of an earlier run).

Runs the way the README says, in a clean shell (env -i, stock PATH, so python3 is the OS's), one
interleaved round after another; prints each figure's median (min-max) and the ratios old/new.
Run: .ci/.venv/bin/python .ci/bench/setup.py [--rounds 3] [--old COMMIT]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import services  # noqa: E402
from conftest import TEMPLATE  # noqa: E402

STOCK_PATH = "/usr/local/bin:/usr/bin:/bin"
DJANGO_ADMIN = Path(sys.executable).with_name("django-admin")


def template_at(commit, dest):
    """The template as it was at a commit (git archive: what GitHub's zip holds)."""
    dest.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=TEMPLATE, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def first_page(root, env):
    """Seconds from starting the dev server to the hello page."""
    port = services.free_port()
    start = time.perf_counter()
    server = subprocess.Popen([".venv/bin/python", "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200 and b"Hello from" in response.read()
                    return time.perf_counter() - start
            except OSError:
                if server.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError(f"no hello page from {root}") from None
                time.sleep(0.05)
    finally:
        server.terminate()
        server.wait()


def first_run(template, home, work, command="bin/setup"):
    """startproject, then `command` (bin/setup or bin/test), then the first page: seconds of each."""
    work.mkdir()
    env = {"HOME": str(home), "PATH": STOCK_PATH}
    start = time.perf_counter()
    subprocess.run([DJANGO_ADMIN, "startproject", f"--template={template}", "--extension=py,html", "mysite"],
                   cwd=work, check=True, env={"PATH": STOCK_PATH})
    made = time.perf_counter()
    root = work / "mysite"
    subprocess.run([command], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = time.perf_counter()
    figures = {"startproject": made - start, command: done - start}
    if command == "bin/setup":
        figures["first page"] = done - start + first_page(root, env)
    return figures


def git(*args):
    return subprocess.run(["git", *args], cwd=TEMPLATE, check=True, capture_output=True, text=True).stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old", help="commit of the old template (default: before bin/setup used uv)")
    args = parser.parse_args()
    # Default: the template just before bin/setup installed with uv.
    first_uv = git("log", "--reverse", "--format=%H", "-S", "uv pip sync", "--", "bin/setup").split()[0]
    old_commit = git("rev-parse", args.old or f"{first_uv}^").strip()
    tmp = Path(tempfile.mkdtemp(prefix="bench-setup-"))
    templates = {"old": template_at(old_commit, tmp / "old-template"), "new": TEMPLATE}
    warm_homes = {}
    for name, template in templates.items():  # fill each warm HOME's caches once
        warm_homes[name] = tmp / f"home-{name}"
        warm_homes[name].mkdir()
        first_run(template, warm_homes[name], tmp / f"prime-{name}")

    results = {}  # (name, cache, figure) -> [seconds]
    n = 0
    for r in range(args.rounds):
        for cache in ("cold", "warm"):
            for name, template in templates.items():
                for command in ("bin/setup", "bin/test"):
                    if command == "bin/test" and cache == "cold":
                        continue
                    n += 1
                    home = warm_homes[name] if cache == "warm" else tmp / f"home-{n}"
                    home.mkdir(exist_ok=True)
                    for figure, seconds in first_run(template, home, tmp / f"run-{n}", command).items():
                        results.setdefault((name, cache, figure), []).append(seconds)
                    print(f"round {r + 1}: {name} {cache} {command} done", file=sys.stderr)

    def cell(key):
        values = results[key]
        return f"{statistics.median(values):6.1f} ({min(values):.1f}-{max(values):.1f})"

    print(f"old = {old_commit[:10]} (pip), new = working tree (uv); {args.rounds} interleaved rounds, "
          "seconds, median (min-max); env -i, stock PATH (python3 = the OS's)")
    print(f"{'figure':42} {'old':>19} {'new':>19} {'old/new':>8}")
    for cache, figure in [("cold", "bin/setup"), ("cold", "first page"), ("warm", "bin/setup"),
                          ("warm", "first page"), ("warm", "bin/test")]:
        label = {"bin/setup": f"{cache} cache: startproject -> bin/setup done",
                 "first page": f"{cache} cache: startproject -> first page",
                 "bin/test": "warm cache: bin/test, fresh project"}[figure]
        # Ratio round by round (old and new ran back to back), then the median of those.
        ratio = statistics.median(o / n for o, n in zip(results[("old", cache, figure)],
                                                        results[("new", cache, figure)], strict=True))
        print(f"{label:42} {cell(('old', cache, figure)):>19} {cell(('new', cache, figure)):>19} {ratio:7.1f}x")

if __name__ == "__main__":
    main()
