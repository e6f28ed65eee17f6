"""Headless Chromium (Debian's package, installed by .ci/run) driven over the DevTools protocol.

    with Chromium() as browser:
        visit = browser.visit("http://127.0.0.1:8000/")
        visit.requests, browser.evaluate("document.title"), browser.screenshot(path)
"""

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1024,768", "--remote-allow-origins=*",
]


def binary():
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if not path:
        raise RuntimeError("chromium is not installed: run .ci/run once, or apt-get install chromium")
    return path


@dataclass
class Request:
    url: str
    type: str = ""  # Document, Stylesheet, Script...
    status: int = 0
    headers: dict = field(default_factory=dict)
    from_cache: bool = False
    bytes: int = 0  # on the wire, headers included (0 when served from the cache)
    failed: str = ""


@dataclass
class Visit:
    requests: list
    # What the page wrote to the console, Content-Security-Policy violations included: (level, text).
    console: list = field(default_factory=list)


class Chromium:
    """One browser with a fresh profile, one tab; every call has a deadline."""

    def __init__(self, timeout=30):
        self.timeout = timeout
        self.profile = Path(tempfile.mkdtemp(prefix="ci-chromium-"))
        self.proc = None
        self.ws = None
        self.next_id = 0
        self.events = []

    def __enter__(self):
        self.proc = subprocess.Popen(
            [binary(), *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=self.timeout, suppress_origin=True
        )
        self.call("Network.enable")
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Log.enable")
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.ws:
            with contextlib.suppress(Exception):
                self.ws.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method, **params):
        self.next_id += 1
        call_id = self.next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            if "method" in message:
                self.events.append(message)
        raise TimeoutError(method)

    def wait_for(self, method):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for i, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def visit(self, url, settle=0.5):
        """Load `url`, wait for its load event and for the network to settle; what it fetched."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        # Deferred and late requests: read events until none arrives for `settle` seconds.
        self.ws.settimeout(settle)
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.ws.settimeout(self.timeout)
        requests, console = {}, []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Log.entryAdded":
                console.append((params["entry"]["level"], params["entry"]["text"]))
            elif event["method"] == "Runtime.consoleAPICalled":
                texts = [str(arg.get("value", arg.get("description", ""))) for arg in params["args"]]
                console.append((params["type"], " ".join(texts)))
            elif event["method"] == "Runtime.exceptionThrown":
                console.append(("error", params["exceptionDetails"].get("text", "")))
            rid = params.get("requestId")
            if event["method"] == "Network.requestWillBeSent":
                requests[rid] = Request(url=params["request"]["url"], type=params.get("type", ""))
            elif rid in requests:
                req = requests[rid]
                if event["method"] == "Network.responseReceived":
                    response = params["response"]
                    req.status = response["status"]
                    req.headers = {k.lower(): v for k, v in response["headers"].items()}
                    req.from_cache = req.from_cache or response.get("fromDiskCache", False)
                elif event["method"] == "Network.requestServedFromCache":
                    req.from_cache = True
                elif event["method"] == "Network.loadingFinished":
                    req.bytes = int(params.get("encodedDataLength", 0))
                elif event["method"] == "Network.loadingFailed":
                    req.failed = params.get("errorText", "failed")
        self.events.clear()
        return Visit(list(requests.values()), console)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
