"""Static files in production (issue "Static assets"): collectstatic's bundles, served by gunicorn
through WhiteNoise to a real browser, and on S3 (a moto server on loopback)."""

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import brotli
import pytest
from conftest import NAME, TEMPLATE, services

from chromium import Chromium

ARTIFACTS = TEMPLATE / ".ci" / "artifacts"
GROUPS = {"css": "css/site.css", "js": "js/site.js"}
# What hello.css and hello.js do to the page, as a browser shows it.
ACCENT = "rgb(12, 99, 70)"
JS_TEXT = "JavaScript: the site bundle ran."


def prod_env(**extra):
    """Only what a Heroku app's config vars hold (the buildpack's collectstatic sees just these).
    The database is never reached by collectstatic: the port is closed."""
    return {
        "DJANGO_SETTINGS_MODULE": f"{NAME}.settings.prod",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1",
        "DATABASE_URL": f"postgres://app:pw@127.0.0.1:{services.free_port()}/app",
        "SECURE_SSL_REDIRECT": "false",  # plain http on loopback
        **extra,
    }


def ensure_prod_reqs(project):
    """gunicorn and the rest of reqs/prod.txt, which Heroku installs and bin/setup does not."""
    if not (project.bin / "gunicorn").exists():
        project.install_prod()


def source_minified(project, env):
    """Each group's sources in order, and each minified alone by the project's own compressor."""
    script = """
import json
import django
django.setup()
from django.contrib.staticfiles import finders
from pipeline.packager import Packager
from {name}.libs.minify import MinifyCompressor
out = {{}}
for kind in ("css", "js"):
    minify = getattr(MinifyCompressor(verbose=False), "compress_" + kind)
    paths = Packager().package_for(kind, "site").paths
    out[kind] = [[p, open(finders.find(p)).read(), minify(open(finders.find(p)).read())] for p in paths]
print(json.dumps(out))
""".format(name=NAME)
    return json.loads(project.run(project.bin / "python", "-c", script, env=env).stdout)


@pytest.fixture(scope="module")
def collected(project, tmp_path_factory):
    """collectstatic as Heroku's build runs it: prod settings, only the app's config vars."""
    ensure_prod_reqs(project)
    env = prod_env()
    build_env = {"PATH": f"{project.bin}:/usr/bin:/bin", "HOME": str(tmp_path_factory.mktemp("home")), **env}
    result = subprocess.run(
        [project.bin / "python", "manage.py", "collectstatic", "--noinput", "--clear"],
        cwd=project.path, env=build_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and "post-processed" in result.stdout, result.stdout + result.stderr
    root = project.path / "staticfiles"
    manifest = json.loads((root / "staticfiles.json").read_text())["paths"]
    return root, manifest, source_minified(project, env)


@pytest.fixture(scope="module")
def web(project, collected, postgres, redis):
    """gunicorn under prod settings with the collected files (WhiteNoise serves them). The hello
    page reads a feature flag (waffle), so it gets a migrated database; production's web process
    needs a broker."""
    database = {"DATABASE_URL": postgres.url, "DATABASE_SSL_REQUIRE": "false", "REDIS_URL": redis.url}
    project.manage("migrate", "--noinput", env=prod_env(**database))
    port = services.free_port()
    env = prod_env(PORT=str(port), WEB_CONCURRENCY="1", **database)
    proc = subprocess.Popen(
        [project.bin / "gunicorn", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"],
        cwd=project.path, env=project.env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        services.wait_for_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        out = proc.communicate(timeout=30)[0]
        assert "Traceback" not in out, out


def get(url, **headers):
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def asset_links(html):
    return re.findall(r'(?:href|src)="([^"]+\.(?:css|js))"', html)


def test_collectstatic_builds_hashed_minified_concatenated_bundles(collected):
    root, manifest, sources = collected

    for kind, output in GROUPS.items():
        hashed = manifest[output]
        bundle = (root / hashed).read_bytes()
        # Named after its content: the first 12 hex digits of its MD5.
        assert hashed == output.replace(".", f".{hashlib.md5(bundle).hexdigest()[:12]}.")
        text = bundle.decode()
        raw = sum(len(source) for _, source, _ in sources[kind])
        assert len(sources[kind]) >= 2 and len(text) < 0.7 * raw, (len(text), raw)
        # The concatenation of its sources, each minified, in the group's order.
        positions = [text.find(minified.rstrip(";")) for _, _, minified in sources[kind]]
        assert -1 not in positions and positions == sorted(positions), (positions, text)
        # Compressed copies beside it, for WhiteNoise to serve.
        assert brotli.decompress((root / f"{hashed}.br").read_bytes()) == bundle
        print(f"{hashed}: {raw} bytes of sources -> {len(bundle)} minified")


def test_pages_link_bundles_served_compressed_and_cached_forever(web, collected):
    root, manifest, _ = collected

    status, headers, body = get(f"{web}/")
    html = body.decode()

    assert status == 200
    # The HTML itself may change at any deploy: never cached for long.
    assert "immutable" not in headers.get("cache-control", "")
    assert asset_links(html) == [f"/static/{manifest['css/site.css']}", f"/static/{manifest['js/site.js']}"]
    for link in asset_links(html):
        status, headers, body = get(f"{web}{link}", **{"Accept-Encoding": "br, gzip"})
        assert status == 200 and headers["content-encoding"] == "br", headers
        assert headers["content-type"].startswith(("text/css", "text/javascript"))
        assert "immutable" in headers["cache-control"] and "max-age=315360000" in headers["cache-control"]
        assert brotli.decompress(body) == (root / link.removeprefix("/static/")).read_bytes()
        status, headers, body = get(f"{web}{link}", **{"Accept-Encoding": "gzip"})
        assert headers["content-encoding"] == "gzip"


def favicon_is_linked_and_served(base, project):
    status, _, body = get(f"{base}/")
    assert status == 200 and '<link rel="icon" href="/favicon.ico">' in body.decode()
    status, headers, body = get(f"{base}/favicon.ico")
    assert status == 200 and headers["content-type"] in ("image/x-icon", "image/vnd.microsoft.icon")
    assert body == (project.path / NAME / "public/favicon.ico").read_bytes()


def test_favicon_under_prod_settings(web, project):
    favicon_is_linked_and_served(web, project)


def render_hello(project, env):
    """The hello page as the web process renders it under `env` (no request needed)."""
    return project.run(
        project.bin / "python", "-c",
        "import django; django.setup(); from django.template.loader import render_to_string; "
        "print(render_to_string('core/hello.html', {'project_name': 'x', 'django_version': '5'}))",
        env=env,
    ).stdout


def test_a_cdn_in_front_of_gunicorn_gets_the_same_hashed_names(project, collected):
    _, manifest, _ = collected

    page = render_hello(project, prod_env(STATIC_HOST="https://d222.cloudfront.test/"))

    assert asset_links(page) == [
        f"https://d222.cloudfront.test/static/{manifest[out]}" for out in GROUPS.values()
    ]


def test_debug_pages_link_each_source_file_and_runserver_serves_it(project):
    """bin/dev's settings: every source file of a group linked as it is, each one served."""
    port = services.free_port()
    proc = subprocess.Popen(
        [project.bin / "python", "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=project.path, env=project.env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        services.wait_for_port(port, timeout=60)
        status, _, body = get(f"http://127.0.0.1:{port}/")
        links = asset_links(body.decode())
        assert status == 200 and len(links) >= 4, links
        assert not [link for link in links if "site" in link], links
        for link in links:
            status, _, body = get(f"http://127.0.0.1:{port}{link}")
            source = project.path / NAME / link.removeprefix("/")
            assert status == 200 and body == source.read_bytes(), link
        favicon_is_linked_and_served(f"http://127.0.0.1:{port}", project)
    finally:
        os.killpg(proc.pid, 15)
        out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out


def test_browser_loads_the_page_applies_css_and_runs_js(web):
    with Chromium() as browser:
        visit = browser.visit(f"{web}/")
        assets = [r for r in visit.requests if r.type in ("Stylesheet", "Script")]
        color = browser.evaluate("getComputedStyle(document.querySelector('h1')).color")
        state = browser.evaluate("document.getElementById('js-status').dataset.state")
        text = browser.evaluate("document.getElementById('js-status').textContent")
        shot = browser.screenshot(ARTIFACTS / "static-hello.png")
    print(f"screenshot: {shot}")

    assert [r.type for r in assets] == ["Stylesheet", "Script"], visit.requests
    for request in assets:
        assert request.status == 200 and not request.failed, request
        assert request.headers.get("content-encoding") == "br", request
    assert color == ACCENT
    assert state == "ready" and text == JS_TEXT
    assert shot.stat().st_size > 1000


# --- S3 ---------------------------------------------------------------------------------------

BUCKET = "djeroku-assets"


@pytest.fixture(scope="module")
def s3():
    """A real S3 HTTP endpoint on loopback (moto's server), with a bucket set up as README says:
    static/ readable by anyone through a bucket policy, everything else private."""
    port = services.free_port()
    server = services.Process(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)], port
    ).start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="ci", aws_secret_access_key="ci",
    )
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "PublicStatic", "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{BUCKET}/static/*",
        }],
    }))
    server.endpoint, server.client = endpoint, client
    yield server
    server.close()


def s3_env(s3):
    return prod_env(
        AWS_STORAGE_BUCKET_NAME=BUCKET, AWS_ACCESS_KEY_ID="ci", AWS_SECRET_ACCESS_KEY="ci",
        AWS_S3_REGION_NAME="us-east-1", AWS_S3_ENDPOINT_URL=s3.endpoint,
    )


def test_s3_collectstatic_uploads_hashed_bundles_and_pages_link_them(project, s3):
    ensure_prod_reqs(project)
    env = s3_env(s3)
    result = project.manage("collectstatic", "--noinput", env=env)
    assert "post-processed" in result.stdout, result.stdout + result.stderr

    status, headers, body = get(f"{s3.endpoint}/{BUCKET}/static/staticfiles.json")
    assert status == 200 and headers["cache-control"] == "public, max-age=60"
    manifest = json.loads(body)["paths"]
    links = asset_links(render_hello(project, env))
    assert links == [f"{s3.endpoint}/{BUCKET}/static/{manifest[out]}" for out in GROUPS.values()]
    for link, kind in zip(links, ("text/css", "text/javascript"), strict=True):
        status, headers, body = get(link)
        assert status == 200 and headers["content-type"] == kind, headers
        assert headers["cache-control"] == "public, max-age=31536000, immutable"
        assert link.split("/static/")[1].split(".")[1] == hashlib.md5(body).hexdigest()[:12]
    # An image of the admin's, hashed and uploaded like every other file.
    status, headers, _ = get(f"{s3.endpoint}/{BUCKET}/static/{manifest['admin/img/icon-yes.svg']}")
    assert status == 200 and headers["content-type"] == "image/svg+xml"
    # A CDN in front of the bucket: pages link the same hashed files on its host.
    cdn = asset_links(render_hello(project, {**env, "AWS_S3_CUSTOM_DOMAIN": "d111.cloudfront.test"}))
    assert cdn == [f"https://d111.cloudfront.test/static/{manifest[out]}" for out in GROUPS.values()]


def test_s3_media_uploads_are_private_behind_signed_links(project, s3):
    ensure_prod_reqs(project)
    script = (
        "import django; django.setup()\n"
        "from django.core.files.base import ContentFile\n"
        "from django.core.files.storage import default_storage as s\n"
        "name = s.save('avatars/me.png', ContentFile(b'\\x89PNG not really'))\n"
        "again = s.save('avatars/me.png', ContentFile(b'another'))\n"
        "print(name, again, s.url(name))\n"
    )
    name, again, url = project.run(project.bin / "python", "-c", script, env=s3_env(s3)).stdout.split()

    assert name == "avatars/me.png" and again != name  # an upload never replaces another
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url
    status, headers, body = get(url)
    assert status == 200 and body == b"\x89PNG not really"
    assert headers["content-type"] == "image/png"
    status, _, _ = get(url.split("?")[0])  # without the signature
    assert status == 403
    grants = s3.client.get_object_acl(Bucket=BUCKET, Key=f"media/{name}")["Grants"]
    assert not [g for g in grants if "AllUsers" in str(g["Grantee"])], grants
