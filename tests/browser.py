"""Open a local HTML page in headless Chromium and report what a reader would see, standard library only.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: it reads commands on
fd 3 and writes replies and events on fd 4, each a JSON message ending in a NUL byte), so no websocket
client or browser-automation package is needed. :func:`inspect_page` loads the page at a given viewport
width, collects console errors, uncaught exceptions and failed loads, evaluates a JavaScript expression in
the page, and saves a full-page screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH (``MECHDIFF_CHROMIUM`` overrides), or None."""
    override = os.environ.get("MECHDIFF_CHROMIUM")
    if override:
        return shutil.which(override) or (override if Path(override).exists() else None)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class _Pipe:
    """One DevTools session over Chromium's debugging pipe."""

    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer, self.next_id, self.events = b"", 0, []

    def _messages(self, deadline: float):
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                yield json.loads(raw)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the debugging pipe (exit {self.proc.poll()})")
                self.buffer += chunk

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20.0):
        """Send a command and wait for its result; events that arrive meanwhile are kept in ``events``."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        for reply in self._messages(time.monotonic() + timeout):
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 20.0) -> dict:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        for ev in self._messages(time.monotonic() + timeout):
            if ev.get("method") == method:
                return ev
            self.events.append(ev)
        raise AssertionError("unreachable")


def _problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and error log entries (failed image or resource loads)."""
    out = []
    for ev in events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str((d.get("exception") or {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            out.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".rstrip())
    return out


def inspect_page(page: Path, script: str, width: int = 1280, height: int = 900,
                 screenshot: Path | None = None, timeout: float = 30.0) -> dict:
    """Load ``page`` (a local file) at ``width`` x ``height`` CSS pixels, then return ``{"result": the value of
    the JavaScript expression ``script`` evaluated in the page after load, "errors": [console errors,
    exceptions, failed loads]}``; with ``screenshot``, save a full-page PNG there."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium on PATH")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    # the child needs them as fds 3 (commands in) and 4 (replies out); move them clear of 3 and 4 first
    hi = [os.dup(fd) for fd in (to_chrome_r, from_chrome_w)]
    while min(hi) <= 4:
        hi = [os.dup(fd) for fd in hi]
    src_in, src_out = hi

    def child_fds():
        os.dup2(src_in, 3)
        os.dup2(src_out, 4)

    profile = tempfile.mkdtemp(prefix="mechdiff-chromium-")
    args = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=False, preexec_fn=child_fds)  # dup2 leaves 3 and 4 inheritable
    for fd in (to_chrome_r, from_chrome_w, src_in, src_out):
        os.close(fd)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        pipe.send("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout=timeout)
        value = pipe.send("Runtime.evaluate", {"expression": script, "returnByValue": True, "awaitPromise": True},
                          session=session)
        if "exceptionDetails" in value:
            raise RuntimeError(f"the check script failed: {value['exceptionDetails']}")
        if screenshot is not None:
            size = pipe.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            shot = pipe.send("Page.captureScreenshot",
                             {"format": "png", "captureBeyondViewport": True,
                              "clip": {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}},
                             session=session, timeout=timeout)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        pipe.send("Runtime.evaluate", {"expression": "0"}, session=session)  # flush late console events
        return {"result": value["result"].get("value"), "errors": _problems(pipe.events)}
    finally:
        try:
            pipe.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - already gone; killed below
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for fd in (to_chrome_w, from_chrome_r):
            os.close(fd)
        shutil.rmtree(profile, ignore_errors=True)
