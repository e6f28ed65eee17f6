"""Static files benchmark: what the hello page costs a browser on its first and its repeat visit,
served by gunicorn (WhiteNoise) under production settings and loaded by headless Chromium.

    .ci/.venv/bin/python .ci/bench/static.py [PROJECT]

PROJECT is a project made from this template with .venv set up; without it one is rendered and set
up in a temporary folder first (a minute). Prints figures and ratios from one run.
"""

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from chromium import Chromium  # noqa: E402
from conftest import NAME, PROJECT_PYTHON, Project, readme_command, render  # noqa: E402
from test_static import asset_links, ensure_prod_reqs, prod_env  # noqa: E402

import services  # noqa: E402

SOURCES = """
import json, django
django.setup()
from django.contrib.staticfiles import finders
from pipeline.packager import Packager
print(json.dumps({k: [(p, len(open(finders.find(p), "rb").read()))
                      for p in Packager().package_for(k, "site").paths] for k in ("css", "js")}))
"""


def body(url, encoding):
    request = urllib.request.Request(url, headers={"Accept-Encoding": encoding})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def main():
    if len(sys.argv) > 1:
        project = Project(Path(sys.argv[1]).resolve())
    else:
        path = render(Path(tempfile.mkdtemp(prefix="bench-static-")), readme_command())
        subprocess.run(["bin/setup"], cwd=path, check=True, env={**os.environ, "PYTHON": PROJECT_PYTHON})
        project = Project(path)
    ensure_prod_reqs(project)
    env = prod_env()
    project.manage("collectstatic", "--noinput", "--clear", env=env)
    sources = json.loads(project.run(project.bin / "python", "-c", SOURCES, env=env).stdout)

    port = services.free_port()
    proc = subprocess.Popen(
        [project.bin / "gunicorn", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"],
        cwd=project.path, env=project.env(**env, WEB_CONCURRENCY="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        services.wait_for_port(port, timeout=60)
        base = f"http://127.0.0.1:{port}"
        html = body(f"{base}/", "identity")
        links = asset_links(html.decode())
        minified = sum(len(body(base + link, "identity")) for link in links)
        served = sum(len(body(base + link, "br")) for link in links)
        written = sum(size for files in sources.values() for _, size in files)
        with Chromium() as browser:
            first = browser.visit(f"{base}/")
            repeat = browser.visit(f"{base}/")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)

    def assets(visit):
        return [r for r in visit.requests if r.type in ("Stylesheet", "Script")]

    def wire(visit):
        return sum(r.bytes for r in visit.requests)

    n_sources = sum(len(files) for files in sources.values())
    rows = [
        ("first visit, as written (DEBUG: each source file)", len(html) + written, n_sources),
        ("first visit, bundled and minified (identity)", len(html) + minified, len(links)),
        ("first visit, as served (brotli)", len(html) + served, len(links)),
    ]
    print(f"hello page of {NAME}: HTML {len(html)} bytes; CSS+JS sources {written} bytes in "
          f"{n_sources} files, bundles {minified} bytes minified, {served} bytes brotli")
    print(f"{'':52} {'HTML+CSS+JS bytes':>18} {'asset requests':>15}")
    for label, size, count in rows:
        print(f"{label:52} {size:>18} {count:>15}")
    print(f"as served / as written: {rows[2][1] / rows[0][1]:.2f} "
          f"(CSS+JS alone: {served / written:.2f})")
    fetched = [r for r in assets(repeat) if not r.from_cache]
    print(f"Chromium, first visit: {len(assets(first))} asset requests, {wire(first)} bytes on the "
          f"wire (headers included)")
    print(f"Chromium, repeat visit: {len(fetched)} asset requests to the server "
          f"({len(assets(repeat)) - len(fetched)} from its cache), {wire(repeat)} bytes on the wire "
          f"(the HTML only)")


if __name__ == "__main__":
    main()
