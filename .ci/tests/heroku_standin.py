"""
A stand-in for Heroku's Platform API on 127.0.0.1, for driving the real Heroku CLI in tests.

It keeps state (apps, add-ons and their attachments, config vars, features, releases, slugs,
formation, pipelines, couplings, promotions, Postgres backup schedules) and answers like Heroku,
and it REJECTS any request whose route or body does not match Heroku's published JSON hyper-schema
(../shared/heroku/platform-api-schema.json beside the checkout): an unknown route gets 404, a body
that fails the link's schema (or carries a property the schema does not name) gets 422, and both
are kept in `rejected` for the tests to assert on. Path parameters are checked against the schema's
identity definitions too. As on Heroku, a Platform API request without the account's token
(`Authorization: Bearer API_KEY`) gets 401, and is kept in `rejected` too.

A test can hold the requests of one link (`hold("config-var Update")`): each waits, its gate in
`waiting`, until the test sets that gate, so the test can look at the machine (`ps`) or press
Ctrl-C while the client waits for Heroku.

Also served, outside that schema: the few Heroku Data routes that `pg:backups:*` and
`pg:connection-pooling:attach` call (the CLI sends them to HEROKU_DATA_HOST, here the same server), and a refusing HTTPS proxy: the CLI reaches
GitHub-side hosts directly (`pipelines:diff`), so tests set HTTPS_PROXY to this server, which answers
CONNECT with 403 and records the host, and nothing leaves the machine.
"""

import hashlib
import itertools
import json
import queue
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

BASE = "urn:heroku-platform-api"
# Where the real CLI sends what the published schema does not describe, and Heroku accepts it:
# (definition, link title, property) whose value the CLI wraps as {"name": ...}; it is checked
# unwrapped. Each use is counted in StandIn.leniencies.
WRAPPED_IDENTITIES = {("add-on", "Create", "plan")}
# `ps:scale` sends quantities as strings ("1"); Heroku takes them, the schema says integer: a
# digit string is checked as the integer it names.
STRING_QUANTITIES = {("formation", "Batch Update")}
# Properties the real CLI sends that the published schema does not name (it allows them: its
# objects are open; this stand-in is stricter and names each one it lets through).
EXTRA_PROPERTIES = {("pipeline", "Create"): {"generation"}}
# Bodies the real CLI sends to links the schema gives none: `pipelines:destroy` sends the name.
BODY_WITHOUT_SCHEMA = {("pipeline", "Delete"): {"name"}}

# What each add-on service sets in its app's config, as Heroku's add-ons do.
ADDON_CONFIG = {
    "heroku-postgresql": {"DATABASE_URL": "postgres://u:p@ec2-0-0-0-0.compute.amazonaws.com:5432/d"},
    "heroku-redis": {"REDIS_URL": "rediss://:p@ec2-0-0-0-0.compute.amazonaws.com:6380"},
    "memcachier": {
        "MEMCACHIER_SERVERS": "mc1.dev.ec2.memcachier.com:11211",
        "MEMCACHIER_USERNAME": "user",
        "MEMCACHIER_PASSWORD": "password",
    },
    "papertrail": {"PAPERTRAIL_API_TOKEN": "token"},
    "newrelic": {"NEW_RELIC_LICENSE_KEY": "key", "NEW_RELIC_LOG": "stdout"},
    "scheduler": {},
    "mailgun": {
        "MAILGUN_SMTP_SERVER": "smtp.mailgun.org",
        "MAILGUN_SMTP_LOGIN": "postmaster@example.mailgun.org",
        "MAILGUN_SMTP_PASSWORD": "password",
        "MAILGUN_SMTP_PORT": "587",
    },
}
ATTACH_AS = {
    "heroku-postgresql": "DATABASE",
    "heroku-redis": "REDIS",
    "memcachier": "MEMCACHIER",
    "papertrail": "PAPERTRAIL",
    "newrelic": "NEW_RELIC",
    "scheduler": "SCHEDULER",
    "mailgun": "MAILGUN",
}
# Plans the stand-in knows; a service's default plan comes first.
PLANS = {
    "heroku-postgresql": ["essential-0", "essential-1", "standard-0"],
    "heroku-redis": ["mini", "premium-0"],
    "memcachier": ["dev", "100"],
    "papertrail": ["choklad", "fixa"],
    "newrelic": ["wayne"],
    "scheduler": ["standard"],
    "mailgun": ["starter", "foundation"],
}
APP_FEATURES = ["runtime-dyno-metadata", "runtime-dyno-build-metadata", "preboot", "http-session-affinity"]
REGIONS = {"us": "United States", "eu": "Europe"}
EMAIL = "developer@example.com"
ACCOUNT_ID = str(uuid.UUID(int=1))
API_KEY = "test-api-key"  # the account's token: HEROKU_API_KEY for the CLI


def now():
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class HerokuError(Exception):
    def __init__(self, status, id, message, **extra):
        super().__init__(message)
        self.status, self.body = status, {"id": id, "message": message, **extra}


class Rejected(HerokuError):
    """The request does not match the Platform API's schema."""


def not_found(what):
    return HerokuError(404, "not_found", f"Couldn't find that {what}.", resource=what)


class Schema:
    """Routes and request bodies from the Platform API's hyper-schema."""

    def __init__(self, path):
        self.root = json.loads(Path(path).read_text())
        self.registry = Registry().with_resource(
            BASE, Resource(contents=self.root, specification=DRAFT4)
        )
        self.routes = []
        self.leniencies = []
        for name, definition in self.root["definitions"].items():
            for index, link in enumerate(definition.get("links", [])):
                if "method" not in link:
                    continue
                refs = [urllib.parse.unquote(m) for m in re.findall(r"\{\((.*?)\)\}", link["href"])]
                pattern = re.sub(r"\{\(.*?\)\}", "([^/]+)", link["href"])
                pointer = f"#/definitions/{name}/links/{index}/schema"
                self.routes.append(
                    (link["method"], re.compile(f"^{pattern}$"), refs, name, link, pointer)
                )

    def validator(self, pointer):
        return jsonschema.Draft4Validator({"$ref": BASE + pointer}, registry=self.registry)

    def errors(self, pointer, value):
        return [e.message for e in self.validator(pointer).iter_errors(value)]

    def match(self, method, path, body):
        """(definition, link title, params) for the request, or raise HerokuError."""
        candidates = []
        for verb, regex, refs, name, link, pointer in self.routes:
            found = regex.match(path)
            if verb != method or not found:
                continue
            params = [urllib.parse.unquote(v) for v in found.groups()]
            bad = [
                f"{value!r}: {msg}"
                for ref, value in zip(refs, params, strict=True)
                if value != "~"
                for msg in self.errors(ref, value)
            ]
            if bad:
                candidates.append((None, bad))
                continue
            if "schema" in link:
                checked = body
                if isinstance(body, dict):
                    checked = dict(body)
                    for prop in [p for d, t, p in WRAPPED_IDENTITIES if (d, t) == (name, link["title"])]:
                        value = checked.get(prop)
                        if isinstance(value, dict) and list(value) in (["name"], ["id"]):
                            checked[prop] = next(iter(value.values()))
                            self.leniencies.append(f"{name} {link['title']}: {prop} as {value}")
                if (name, link["title"]) in STRING_QUANTITIES and isinstance(body, dict):
                    updates = [dict(u) for u in body.get("updates", []) if isinstance(u, dict)]
                    for update in updates:
                        if isinstance(update.get("quantity"), str) and update["quantity"].isdigit():
                            update["quantity"] = int(update["quantity"])
                            self.leniencies.append(f"{name} {link['title']}: quantity as a string")
                    checked = {**checked, "updates": updates}
                problems = self.errors(pointer, checked if checked is not None else {})
                known = set(link["schema"].get("properties", {}))
                if isinstance(body, dict) and known and not link["schema"].get("patternProperties"):
                    extra = body.keys() - known
                    if allowed := extra & EXTRA_PROPERTIES.get((name, link["title"]), set()):
                        self.leniencies.append(f"{name} {link['title']}: {sorted(allowed)} let through")
                    problems += [f"{key!r} is not a property of this request" for key in extra - allowed]
                if problems:
                    candidates.append((None, problems))
                    continue
            elif body not in (None, {}):
                allowed = BODY_WITHOUT_SCHEMA.get((name, link["title"]), set())
                if not (isinstance(body, dict) and body.keys() <= allowed):
                    candidates.append((None, ["this route takes no body"]))
                    continue
                self.leniencies.append(f"{name} {link['title']}: body {sorted(body)} let through")
            return name, link["title"], params
        if not candidates:
            raise Rejected(404, "not_found", f"No {method} {path} in the Platform API schema.")
        raise Rejected(
            422, "invalid_params", "; ".join(p for _, problems in candidates for p in problems)
        )


class Platform:
    """Heroku's state and behaviour, as far as the CLI's commands in these tests need it."""

    def __init__(self, port):
        self.port = port
        self.lock = threading.RLock()
        self.apps = {}  # name -> app dict (with private keys starting with "_")
        self.addons = {}  # id -> add-on dict
        self.attachments = {}  # id -> attachment dict
        self.pipelines = {}  # id -> pipeline
        self.couplings = {}  # id -> coupling
        self.promotions = {}  # id -> promotion (with "_targets")
        self.schedules = {}  # add-on id -> [transfer schedule]
        self.backups = {}  # add-on id -> [backup transfer]
        self.fail_addons = set()  # services whose creation fails (to test a failure mid-way)
        # App names someone else holds -> what reading one answers: 403 (an app you were once
        # given access to, say) or 404 (Heroku does not say that a name it hides exists).
        # Creating one answers 422 "Name is already taken", as Heroku does.
        self.others = {}
        self.dynos = {}  # rendezvous secret -> one-off dyno to run
        self.rendezvous = None  # a Rendezvous, when one-off dynos are wanted
        self.numbers = itertools.count(1000)

    # --- Lookups ----------------------------------------------------------------------------

    def app(self, ident):
        if ident in self.others:
            if self.others[ident] == 403:
                raise HerokuError(403, "forbidden", f"You do not have access to the app {ident}.")
            raise not_found("app")
        for app in self.apps.values():
            if ident in (app["id"], app["name"]):
                return app
        raise not_found("app")

    def pipeline(self, ident):
        for pipeline in self.pipelines.values():
            if ident in (pipeline["id"], pipeline["name"]):
                return pipeline
        raise not_found("pipeline")

    def addon(self, ident, app=None):
        for addon in self.addons.values():
            if ident in (addon["id"], addon["name"]) and (app is None or addon["app"]["id"] == app["id"]):
                return addon
        raise not_found("add-on")

    def release(self, app, ident):
        for release in app["_releases"]:
            if ident in (release["id"], str(release["version"]), f"v{release['version']}"):
                return release
        raise not_found("release")

    @staticmethod
    def ref(thing):
        return {"id": thing["id"], "name": thing["name"]}

    def public(self, app):
        return {k: v for k, v in app.items() if not k.startswith("_")}

    # --- Changes that make releases, as on Heroku ---------------------------------------------

    def add_release(self, app, description, slug=None):
        current = app["_releases"][-1] if app["_releases"] else None
        for release in app["_releases"]:
            release["current"] = False
        release = {
            "id": str(uuid.uuid4()),
            "version": len(app["_releases"]) + 1,
            "description": description,
            "status": "succeeded",
            "current": True,
            "eligible_for_rollback": True,
            "slug": slug if slug is not None else (current or {}).get("slug"),
            "oci_image": None,
            "app": self.ref(app),
            "user": {"id": ACCOUNT_ID, "email": EMAIL},
            "addon_plan_names": [a["plan"]["name"] for a in self.app_addons(app)],
            "artifacts": [],
            "output_stream_url": None,
            "created_at": now(),
            "updated_at": now(),
            "_config": dict(app["_config"]),
        }
        app["_releases"].append(release)
        app["released_at"] = release["created_at"]
        return release

    def set_config(self, app, changes, description=None):
        for key, value in changes.items():
            if value is None:
                app["_config"].pop(key, None)
            else:
                app["_config"][key] = value
        keys = ", ".join(changes)
        self.add_release(app, description or f"Set {keys} config vars")

    def app_addons(self, app):
        return [a for a in self.addons.values() if a["app"]["id"] == app["id"]]

    def formation(self, app):
        slug = (app["_releases"][-1]["slug"] if app["_releases"] else None) or {}
        types = app["_slugs"].get(slug.get("id"), {}).get("process_types", {})
        out = []
        for kind, command in types.items():
            quantity = app["_formation"].setdefault(kind, 1 if kind == "web" else 0)
            out.append(
                {
                    "id": str(uuid.uuid5(uuid.NAMESPACE_URL, app["id"] + kind)),
                    "type": kind,
                    "command": command,
                    "quantity": quantity,
                    "size": "Basic",
                    "app": self.ref(app),
                    "created_at": app["created_at"],
                    "updated_at": now(),
                }
            )
        return out

    # --- Handlers: (definition, link title) -> method -------------------------------------------

    def handle(self, name, title, params, body, query, headers):
        handler = getattr(self, re.sub(r"\W+", "_", f"{name} {title}").lower(), None)
        if handler is None:
            raise HerokuError(501, "not_implemented", f"The stand-in has no handler for {name} {title}.")
        with self.lock:
            return handler(*params, body=body or {}, query=query, headers=headers)

    def account_info(self, **_):
        return 200, {
            "id": ACCOUNT_ID,
            "email": EMAIL,
            "name": "Developer",
            "verified": True,
            "two_factor_authentication": False,
            "allow_tracking": False,
            "beta": False,
            "delinquent_at": None,
            "suspended_at": None,
            "created_at": "2020-01-01T00:00:00Z",
            "updated_at": "2020-01-01T00:00:00Z",
            "default_organization": None,
            "default_team": None,
            "identity_provider": None,
            "sms_number": None,
            "federated": False,
        }

    def account_info_by_user(self, ident, **_):
        if ident not in ("~", ACCOUNT_ID, EMAIL):
            raise not_found("user")
        return self.account_info()

    def account_feature_info(self, feature, **_):
        raise not_found("feature")

    def oauth_authorization_list(self, **_):
        """The account's one authorization: its API key, which does not expire (`auth:token`)."""
        return 200, [
            {
                "id": str(uuid.UUID(int=2)),
                "access_token": {"id": str(uuid.UUID(int=3)), "token": API_KEY, "expires_in": None},
                "client": None,
                "created_at": "2020-01-01T00:00:00Z",
                "description": "Long-lived API key",
                "grant": None,
                "refresh_token": None,
                "scope": ["global"],
                "session": None,
                "updated_at": "2020-01-01T00:00:00Z",
                "user": {"id": ACCOUNT_ID, "email": EMAIL, "full_name": "Developer"},
            }
        ]

    def create_app(self, body, team=None):
        name = body.get("name") or f"app-{next(self.numbers)}"
        if name in self.others or any(a["name"] == name for a in self.apps.values()):
            raise HerokuError(422, "invalid_params", "Name is already taken")
        region = body.get("region") or "us"
        if region not in REGIONS:
            raise not_found("region")
        app_id = str(uuid.uuid4())
        host = f"{name}-{hashlib.sha1(app_id.encode()).hexdigest()[:12]}.herokuapp.com"
        app = {
            "id": app_id,
            "name": name,
            "region": {"id": str(uuid.uuid5(uuid.NAMESPACE_DNS, region)), "name": region},
            "stack": {"id": str(uuid.uuid5(uuid.NAMESPACE_DNS, "heroku-24")), "name": "heroku-24"},
            "build_stack": {"id": str(uuid.uuid5(uuid.NAMESPACE_DNS, "heroku-24")), "name": "heroku-24"},
            "git_url": f"https://git.heroku.com/{name}.git",
            "web_url": f"https://{host}/",
            "owner": {"id": ACCOUNT_ID, "email": EMAIL},
            "team": {"id": str(uuid.uuid5(uuid.NAMESPACE_DNS, team)), "name": team} if team else None,
            "organization": None,
            "space": None,
            "internal_routing": None,
            "acm": False,
            "archived_at": None,
            "buildpack_provided_description": None,
            "build_stack_id": None,
            "create_status": "complete",
            "created_at": now(),
            "updated_at": now(),
            "released_at": None,
            "maintenance": False,
            "repo_size": None,
            "slug_size": None,
            "generation": {"id": str(uuid.uuid5(uuid.NAMESPACE_DNS, "cedar")), "name": "cedar"},
            "_config": {},
            "_releases": [],
            "_slugs": {},
            "_formation": {},
            "_features": dict.fromkeys(APP_FEATURES, False),
        }
        self.apps[name] = app
        self.add_release(app, "Initial release")
        return 201, self.public(app)

    def app_create(self, body, **_):
        return self.create_app(body)

    def team_app_create(self, body, **_):
        return self.create_app(body, team=body.get("team"))

    def app_info(self, ident, **_):
        return 200, self.public(self.app(ident))

    def app_list(self, **_):
        return 200, [self.public(a) for a in self.apps.values()]

    def app_delete(self, ident, **_):
        """As on Heroku: the app's add-ons, their attachments and its pipeline coupling go with it."""
        app = self.app(ident)
        del self.apps[app["name"]]
        for addon in self.app_addons(app):
            del self.addons[addon["id"]]
            self.schedules.pop(addon["id"], None)
        self.attachments = {k: a for k, a in self.attachments.items() if a["app"]["id"] != app["id"]}
        self.couplings = {k: c for k, c in self.couplings.items() if c["app"]["id"] != app["id"]}
        return 200, self.public(app)

    def dyno_create(self, ident, body, **_):
        app = self.app(ident)
        if not self.rendezvous:
            raise HerokuError(503, "unavailable", "This stand-in runs no one-off dynos.")
        secret = uuid.uuid4().hex
        number = next(self.numbers)
        self.dynos[secret] = {"app": app["name"], "command": body["command"], "env": body.get("env") or {}}
        current = app["_releases"][-1]
        return 201, {
            "id": str(uuid.uuid4()),
            "name": f"run.{number}",
            "attach_url": f"rendezvous://127.0.0.1:{self.rendezvous.port}/{secret}",
            "command": body["command"],
            "state": "starting",
            "type": "run",
            "size": body.get("size") or "Basic",
            "app": self.ref(app),
            "release": {"id": current["id"], "version": current["version"]},
            "created_at": now(),
            "updated_at": now(),
        }

    def dyno_list(self, ident, **_):
        self.app(ident)
        return 200, []

    def collaborator_list(self, ident, **_):
        self.app(ident)
        return 200, []

    # Add-ons

    def add_on_create(self, ident, body, **_):
        app = self.app(ident)
        plan = body["plan"] if isinstance(body["plan"], str) else body["plan"].get("name", "")
        service, _, plan_name = plan.partition(":")
        if service not in PLANS or (plan_name and plan_name not in PLANS[service]):
            raise HerokuError(
                422,
                "invalid_params",
                f'Couldn\'t find either the add-on service or the add-on plan of "{plan}".',
            )
        if service in self.fail_addons:
            raise HerokuError(
                422, "provider_error", f"{plan} could not be provisioned: the provider is unavailable."
            )
        plan_name = plan_name or PLANS[service][0]
        number = next(self.numbers)
        prefix = service.removeprefix("heroku-")
        addon = {
            "id": str(uuid.uuid4()),
            "name": f"{prefix}-example-{number}",
            "addon_service": {"id": str(uuid.uuid5(uuid.NAMESPACE_DNS, service)), "name": service},
            "plan": {
                "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{service}:{plan_name}")),
                "name": f"{service}:{plan_name}",
            },
            "app": self.ref(app),
            "billing_entity": {"id": app["id"], "name": app["name"], "type": "app"},
            "billed_price": {"cents": 0, "contract": False, "unit": "month"},
            "config_vars": list(ADDON_CONFIG[service]),
            "actions": [],
            "provider_id": str(number),
            "state": "provisioned",
            "web_url": f"https://addons-sso.heroku.com/apps/{app['id']}/addons/{number}",
            "created_at": now(),
            "updated_at": now(),
        }
        attachment_name = (body.get("attachment") or {}).get("name") or ATTACH_AS[service]
        config = dict(ADDON_CONFIG[service])
        taken = {a["name"] for a in self.attachments.values() if a["app"]["id"] == app["id"]}
        if attachment_name in taken:  # a second add-on of a service gets a color name, as on Heroku
            attachment_name = f"HEROKU_{prefix.upper()}_{number}"
            config = {f"{attachment_name}_URL": next(iter(config.values()), "")}
        self.addons[addon["id"]] = addon
        attachment = {
            "id": str(uuid.uuid4()),
            "name": attachment_name,
            # With the CLI's Accept-Inclusion: addon:plan,config_vars (Heroku adds them on request).
            "addon": {"id": addon["id"], "name": addon["name"], "app": self.ref(app), "plan": addon["plan"]},
            "config_vars": list(config),
            "app": self.ref(app),
            "namespace": None,
            "log_input_url": None,
            "web_url": addon["web_url"],
            "created_at": now(),
            "updated_at": now(),
        }
        self.attachments[attachment["id"]] = attachment
        self.set_config(app, config, f"Attach {attachment_name} (@ref:{addon['name']})")
        return 201, addon

    def add_on_list_by_app(self, ident, **_):
        return 200, self.app_addons(self.app(ident))

    def add_on_info(self, ident, **_):
        return 200, self.addon(ident)

    def add_on_info_by_app(self, app_ident, ident, **_):
        return 200, self.addon(ident, self.app(app_ident))

    def add_on_list(self, **_):
        return 200, list(self.addons.values())

    def add_on_resolution(self, body, **_):
        app = self.app(body["app"]) if body.get("app") else None
        found = [
            a
            for a in self.addons.values()
            if body["addon"] in (a["id"], a["name"])
            and (app is None or a["app"]["id"] == app["id"])
            and body.get("addon_service") in (None, a["addon_service"]["name"])
        ]
        if not found:
            raise not_found("add-on")
        return 200, found

    def add_on_attachment_resolution(self, body, **_):
        app = self.app(body["app"]) if body.get("app") else None
        wanted = body["addon_attachment"]
        found = []
        for attachment in self.attachments.values():
            addon = self.addons[attachment["addon"]["id"]]
            if app and attachment["app"]["id"] != app["id"]:
                continue
            if body.get("addon_service") not in (None, addon["addon_service"]["name"]):
                continue
            if wanted in (attachment["id"], attachment["name"], attachment["name"] + "_URL"):
                found.append(attachment)
        if not found:
            raise not_found("add-on attachment")
        return 200, found

    def add_on_attachment_list_by_app(self, ident, **_):
        app = self.app(ident)
        return 200, [a for a in self.attachments.values() if a["app"]["id"] == app["id"]]

    def add_on_attachment_list_by_add_on(self, ident, **_):
        addon = self.addon(ident)
        return 200, [a for a in self.attachments.values() if a["addon"]["id"] == addon["id"]]

    # Config vars and features

    def config_var_info_for_app(self, ident, **_):
        return 200, dict(self.app(ident)["_config"])

    def config_var_update(self, ident, body, **_):
        app = self.app(ident)
        self.set_config(app, body)
        return 200, dict(app["_config"])

    def feature(self, app, name):
        if name not in app["_features"]:
            raise not_found("feature")
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
            "name": name,
            "enabled": app["_features"][name],
            "state": "beta",
            "description": name,
            "doc_url": f"https://devcenter.heroku.com/articles/{name}",
            "display_name": name,
            "feedback_email": "",
            "created_at": app["created_at"],
            "updated_at": now(),
        }

    def app_feature_info(self, ident, name, **_):
        return 200, self.feature(self.app(ident), name)

    def app_feature_list(self, ident, **_):
        app = self.app(ident)
        return 200, [self.feature(app, n) for n in app["_features"]]

    def app_feature_update(self, ident, name, body, **_):
        app = self.app(ident)
        self.feature(app, name)
        app["_features"][name] = body["enabled"]
        return 200, self.feature(app, name)

    # Releases, slugs, formation

    def release_list(self, ident, headers, **_):
        releases = [self.public(r) for r in self.app(ident)["_releases"]]
        if "order=desc" in headers.get("Range", ""):
            releases.reverse()
        match = re.search(r"max=(\d+)", headers.get("Range", ""))
        return 200, releases[: int(match.group(1))] if match else releases

    def release_info(self, ident, release, **_):
        return 200, self.public(self.release(self.app(ident), release))

    def release_create(self, ident, body, **_):
        app = self.app(ident)
        slug = app["_slugs"].get(body["slug"])
        if not slug:
            raise not_found("slug")
        commit = (slug.get("commit") or "")[:8]
        release = self.add_release(app, body.get("description") or f"Deploy {commit}", {"id": slug["id"]})
        return 201, self.public(release)

    def release_rollback(self, ident, body, **_):
        app = self.app(ident)
        target = self.release(app, body["release"])
        app["_config"] = dict(target["_config"])
        release = self.add_release(app, f"Rollback to v{target['version']}", target["slug"])
        return 201, self.public(release)

    def slug_create(self, ident, body, **_):
        app = self.app(ident)
        slug = {
            "id": str(uuid.uuid4()),
            "blob": {"method": "PUT", "url": f"http://127.0.0.1:{self.port}/slug-blob"},
            "buildpack_provided_description": body.get("buildpack_provided_description"),
            "checksum": body.get("checksum"),
            "commit": body.get("commit"),
            "commit_description": body.get("commit_description"),
            "process_types": body["process_types"],
            "size": None,
            "stack": app["stack"],
            "created_at": now(),
            "updated_at": now(),
        }
        app["_slugs"][slug["id"]] = slug
        return 201, slug

    def slug_info(self, ident, slug, **_):
        found = self.app(ident)["_slugs"].get(slug)
        if not found:
            raise not_found("slug")
        return 200, found

    def formation_list(self, ident, **_):
        return 200, self.formation(self.app(ident))

    def formation_batch_update(self, ident, body, **_):
        app = self.app(ident)
        types = {f["type"] for f in self.formation(app)}
        for update in body["updates"]:
            if update["type"] not in types:
                raise HerokuError(404, "not_found", f"Couldn't find that process type ({update['type']}).")
        for update in body["updates"]:
            if "quantity" in update:
                app["_formation"][update["type"]] = int(update["quantity"])
        return 200, [f for f in self.formation(app) if f["type"] in {u["type"] for u in body["updates"]}]

    def filter_apps_apps(self, body, **_):
        wanted = body.get("in", {}).get("id", [])
        return 200, [self.public(a) for a in self.apps.values() if a["id"] in wanted]

    # Pipelines

    def pipeline_create(self, body, **_):
        if any(p["name"] == body["name"] for p in self.pipelines.values()):
            raise HerokuError(422, "invalid_params", "Name has already been taken")
        owner = body.get("owner") or {"id": ACCOUNT_ID, "type": "user"}
        pipeline = {
            "id": str(uuid.uuid4()),
            "name": body["name"],
            "owner": owner,
            "generation": {"id": str(uuid.uuid5(uuid.NAMESPACE_DNS, "cedar")), "name": "cedar"},
            "created_at": now(),
            "updated_at": now(),
        }
        self.pipelines[pipeline["id"]] = pipeline
        return 201, pipeline

    def pipeline_info(self, ident, **_):
        return 200, self.pipeline(ident)

    def pipeline_list(self, query, **_):
        names = query.get("eq[name]")  # `pipelines:info NAME` looks a pipeline up by name
        return 200, [p for p in self.pipelines.values() if not names or p["name"] in names]

    def pipeline_delete(self, ident, **_):
        pipeline = self.pipelines.pop(self.pipeline(ident)["id"])
        self.couplings = {
            k: c for k, c in self.couplings.items() if c["pipeline"]["id"] != pipeline["id"]
        }
        return 200, pipeline

    def coupling_of(self, app):
        for coupling in self.couplings.values():
            if coupling["app"]["id"] == app["id"]:
                return coupling
        return None

    def pipeline_coupling_create(self, body, **_):
        app = self.app(body["app"])
        pipeline = self.pipeline(body["pipeline"])
        if self.coupling_of(app):
            raise HerokuError(422, "invalid_params", "App is already in a pipeline")
        coupling = {
            "id": str(uuid.uuid4()),
            "app": {"id": app["id"]},
            "pipeline": {"id": pipeline["id"]},
            "stage": body["stage"],
            "created_at": now(),
            "updated_at": now(),
        }
        self.couplings[coupling["id"]] = coupling
        return 201, coupling

    def pipeline_coupling_info_by_app(self, ident, **_):
        coupling = self.coupling_of(self.app(ident))
        if not coupling:
            raise not_found("pipeline coupling")
        pipeline = self.pipelines[coupling["pipeline"]["id"]]
        return 200, {**coupling, "pipeline": {"id": pipeline["id"], "name": pipeline["name"]}}

    def pipeline_coupling_list_by_pipeline(self, ident, **_):
        pipeline = self.pipeline(ident)
        return 200, [c for c in self.couplings.values() if c["pipeline"]["id"] == pipeline["id"]]

    def pipeline_coupling_list(self, **_):
        return 200, list(self.couplings.values())

    def pipeline_promotion_create(self, body, **_):
        pipeline = self.pipeline(body["pipeline"]["id"])
        source = self.app(body["source"]["app"]["id"])
        current = source["_releases"][-1]
        if not current["slug"]:
            raise HerokuError(422, "invalid_params", f"{source['name']} has no release to promote")
        promotion = {
            "id": str(uuid.uuid4()),
            "pipeline": {"id": pipeline["id"]},
            "source": {"app": {"id": source["id"]}, "release": {"id": current["id"]}},
            "status": "completed",
            "created_at": now(),
            "updated_at": now(),
        }
        targets = []
        for target in body["targets"]:
            app = self.app(target["app"]["id"])
            release = self.add_release(
                app, f"Promote {source['name']} v{current['version']}", current["slug"]
            )
            app["_slugs"].update(source["_slugs"])
            targets.append(
                {
                    "id": str(uuid.uuid4()),
                    "app": {"id": app["id"]},
                    "release": {"id": release["id"]},
                    "pipeline_promotion": {"id": promotion["id"]},
                    "status": "succeeded",
                    "error_message": None,
                }
            )
        self.promotions[promotion["id"]] = {**promotion, "_targets": targets}
        return 201, promotion

    def pipeline_promotion_info(self, ident, **_):
        promotion = self.promotions.get(ident) or {}
        if not promotion:
            raise not_found("pipeline promotion")
        return 200, {k: v for k, v in promotion.items() if k != "_targets"}

    def pipeline_promotion_target_list(self, ident, **_):
        return 200, self.promotions[ident]["_targets"] if ident in self.promotions else []

    # Heroku Data (pg:backups, pg:connection-pooling), outside the Platform API schema

    def data(self, method, path, body):
        with self.lock:
            transfer = re.fullmatch(r"/client/v11/apps/([^/]+)/transfers/([^/]+)", path)
            if transfer and method == "GET":
                self.app(transfer.group(1))
                for backup in itertools.chain(*self.backups.values()):
                    if transfer.group(2) in (backup["uuid"], str(backup["num"])):
                        return 200, backup
                raise not_found("transfer")
            found = re.fullmatch(
                r"/client/v11/databases/([^/]+)(/transfer-schedules|/backups|/connection-pooling)?", path
            )
            if not found:
                raise HerokuError(404, "not_found", f"No {method} {path} in Heroku Data's API.")
            addon = self.addon(found.group(1))
            if addon["addon_service"]["name"] != "heroku-postgresql":
                raise not_found("database")
            part = found.group(2)
            plan = addon["plan"]["name"].partition(":")[2]
            if method == "GET" and not part:
                return 200, {"info": [{"name": "Plan", "values": [plan]}], "plan": plan}
            if part == "/connection-pooling" and method == "POST":
                return self.attach_pooling(addon, plan, body)
            if part == "/transfer-schedules" and method == "POST":
                if set(body) != {"hour", "timezone", "schedule_name"}:
                    raise HerokuError(422, "invalid_params", f"bad schedule: {body}")
                schedules = self.schedules.setdefault(addon["id"], [])
                schedules[:] = [s for s in schedules if s["name"] != body["schedule_name"]]
                schedule = {"name": body["schedule_name"], "hour": int(body["hour"]), "timezone": body["timezone"]}
                schedules.append(schedule)
                return 201, schedule
            if part == "/transfer-schedules" and method == "GET":
                return 200, self.schedules.get(addon["id"], [])
            if part == "/backups" and method == "POST":
                backups = self.backups.setdefault(addon["id"], [])
                backup = {
                    "uuid": str(uuid.uuid4()),
                    "num": len(backups) + 1,
                    "from_name": "DATABASE",
                    "to_type": "gof3r",
                    "succeeded": True,
                    "started_at": now(),
                    "processed_bytes": 1024,
                    "finished_at": now(),
                    "created_at": now(),
                }
                backups.append(backup)
                return 200, backup
            raise HerokuError(404, "not_found", f"No {method} {path} in Heroku Data's API.")


    def attach_pooling(self, addon, plan, body):
        """`pg:connection-pooling:attach`: an attachment of the database whose URL is PgBouncer's,
        on Standard, Premium, Private and Shield plans (devcenter: postgres-connection-pooling)."""
        if not plan.startswith(("standard", "premium", "private", "shield")):
            raise HerokuError(422, "invalid_params", f"Connection pooling is not available on {plan}.")
        if set(body) != {"app", "credential", "name"} or body["credential"] != "default":
            raise HerokuError(422, "invalid_params", f"bad connection pooling request: {body}")
        app = self.app(body["app"])
        name = body["name"] or "DATABASE_CONNECTION_POOL"
        if any(a["name"] == name and a["app"]["id"] == app["id"] for a in self.attachments.values()):
            raise HerokuError(422, "invalid_params", "Name is already taken")
        attachment = {
            "id": str(uuid.uuid4()),
            "name": name,
            "addon": {"id": addon["id"], "name": addon["name"], "app": self.ref(app), "plan": addon["plan"]},
            "config_vars": [f"{name}_URL"],
            "app": self.ref(app),
            "namespace": "connection-pooling:default",
            "log_input_url": None,
            "web_url": addon["web_url"],
            "created_at": now(),
            "updated_at": now(),
        }
        self.attachments[attachment["id"]] = attachment
        url = "postgres://u:p@ec2-0-0-0-0.compute.amazonaws.com:5433/d"  # PgBouncer's port
        self.set_config(app, {f"{name}_URL": url}, f"Attach {name} (@ref:{addon['name']})")
        return 201, attachment


class Rendezvous:
    """Heroku's rendezvous for `heroku run`: TLS on loopback; the CLI sends the dyno's secret, the
    "dyno" runs its command here (bash, in `workdir`, with the app's config vars) and streams the
    output back. The CLI must trust the certificate: NODE_EXTRA_CA_CERTS=rendezvous.cert."""

    def __init__(self, platform, workdir, path):
        self.platform, self.workdir = platform, workdir
        folder = Path(tempfile.mkdtemp(prefix="rendezvous-"))
        self.cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", key, "-out", self.cert],
            check=True, capture_output=True,
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.cert, key)
        self.path = path
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.runs = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.attach, args=(raw,), daemon=True).start()

    def attach(self, raw):
        with self.context.wrap_socket(raw, server_side=True) as conn:
            conn.settimeout(10)
            secret = conn.makefile("rb").readline().decode().strip()
            dyno = self.platform.dynos.pop(secret, None)
            if dyno is None:
                conn.sendall(b"unknown dyno\r\n")
                return
            # The rendezvous's first line says the dyno is attached; the CLI drops that chunk.
            conn.sendall(b"rendezvous\r\n")
            time.sleep(0.2)
            with self.platform.lock:
                config = dict(self.platform.app(dyno["app"])["_config"])
            env = {"PATH": self.path, "HOME": str(self.workdir), **config, **dyno["env"]}
            result = subprocess.run(
                ["bash", "-c", dyno["command"]], cwd=self.workdir, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
            )
            self.runs.append({**dyno, "output": result.stdout.decode(errors="replace")})
            conn.sendall(result.stdout)
            # As Heroku's rendezvous: the CLI ends the session once it has read the exit status.
            try:
                while conn.recv(4096):
                    pass
            except (OSError, TimeoutError):
                pass

    def close(self):
        self.sock.close()


class Handler(BaseHTTPRequestHandler):
    server_version = "heroku-standin"

    def log_message(self, *args):
        pass

    def do_CONNECT(self):  # noqa: N802 (http.server's names)
        self.server.connects.append(self.path)
        self.send_response(403, "No network in tests")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        self.answer("GET")

    def do_POST(self):  # noqa: N802
        self.answer("POST")

    def do_PATCH(self):  # noqa: N802
        self.answer("PATCH")

    def do_PUT(self):  # noqa: N802
        self.answer("PUT")

    def do_DELETE(self):  # noqa: N802
        self.answer("DELETE")

    def answer(self, method):
        server = self.server
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = "<not JSON>"
        record = {"method": method, "path": url.path, "body": body, "query": url.query}
        server.requests.append(record)
        try:
            if url.path.startswith("/client/v11/"):
                status, out = server.platform.data(method, url.path, body or {})
            else:
                name, title, params = server.schema.match(method, url.path, body)
                record["link"] = f"{name} {title}"
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    raise Rejected(401, "unauthorized", "Invalid credentials provided.")
                if record["link"] == server.held:
                    gate = threading.Event()
                    server.waiting.put(gate)
                    gate.wait(120)
                status, out = server.platform.handle(
                    name, title, params, body, urllib.parse.parse_qs(url.query), self.headers
                )
        except HerokuError as error:
            status, out = error.status, error.body
            if isinstance(error, Rejected) or status == 501:
                server.rejected.append({**record, "why": error.body["message"]})
        record["status"] = status
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)


class StandIn(ThreadingHTTPServer):
    """The server: `url`, `platform` (the state), `requests`, `rejected`, `connects`, `hold`."""

    daemon_threads = True

    def __init__(self, schema_path):
        super().__init__(("127.0.0.1", 0), Handler)
        self.schema = Schema(schema_path)
        self.platform = Platform(self.server_address[1])
        self.requests, self.rejected, self.connects = [], [], []
        self.held, self.waiting = None, queue.Queue()
        self.thread = None

    def hold(self, link):
        """Hold each request to `link` until the test sets its gate (`waiting.get()`)."""
        self.held = link

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self):
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        return self

    def run_dynos(self, workdir, path):
        """Serve `heroku run`: one-off dynos run in `workdir` with PATH `path`."""
        self.platform.rendezvous = Rendezvous(self.platform, workdir, path)
        return self.platform.rendezvous.cert

    def close(self):
        self.held = None
        while not self.waiting.empty():
            self.waiting.get().set()
        if self.platform.rendezvous:
            self.platform.rendezvous.close()
        self.shutdown()
        self.server_close()
