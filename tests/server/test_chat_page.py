"""The chat page at `/`: served as static HTML+JS, and driven for real in headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on fds 3/4), so no extra Python package is needed. The browser
test is skipped when no Chromium binary is installed (Debian: ``apt-get install chromium`` or
``chromium-headless-shell``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_is_served_without_a_key(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for needle in ['id="model"', 'id="prompt"', 'id="send"', 'id="key"', "/v1/chat/completions", "/v1/models",
                   "getReader()", "[DONE]", "Authorization"]:
        assert needle in html, needle
    # the page is self-contained: no external scripts or styles
    assert "<script src" not in html and "<link " not in html


class DevTools:
    """Minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, browser: str, user_dir: str) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        cmd = (f'exec "{browser}" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage '
               f'--no-first-run --remote-debugging-pipe --user-data-dir="{user_dir}" about:blank '
               f"3<&{to_chrome_r} 4>&{from_chrome_w}")
        self.proc = subprocess.Popen(["bash", "-c", cmd], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def _read_message(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_chrome, 65536)
            if not chunk:
                raise RuntimeError("browser closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.wait_for(f"location.href.startsWith({json.dumps(url)}) && document.readyState === 'complete'")

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:  # the page is still loading
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                status = self.js("document.getElementById('status')?.textContent")
                raise AssertionError(f"timed out waiting for {expression!r}; status: {status!r}")
            time.sleep(0.1)

    def close(self) -> None:
        try:
            os.close(self._to_chrome)
            os.close(self._from_chrome)
        except OSError:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.skipif(_browser() is None, reason="no Chromium installed")
def test_chat_page_streams_a_reply_in_headless_chromium(server, tmp_path):
    # what the model says greedily, straight from the API
    want = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {server.api_key}"},
                      json={"model": "tiny2", "messages": [{"role": "user", "content": "Hello there"}],
                            "max_tokens": 8, "temperature": 0}).json()["choices"][0]["message"]["content"]
    dt = DevTools(_browser(), str(tmp_path / "profile"))
    try:
        dt.open(server.url + "/")
        # without a key the page says so
        status = dt.wait_for("(s => s.startsWith('error') && s)(document.getElementById('status').textContent)")
        assert "API key" in status
        # type the key: the model list loads
        dt.js(f"(k => {{ k.value = {json.dumps(server.api_key)}; k.dispatchEvent(new Event('change')); }})"
              "(document.getElementById('key'))")
        dt.wait_for("document.getElementById('model').options.length === 4")
        dt.js("document.getElementById('model').value = 'tiny2';"
              "document.getElementById('max_tokens').value = '8';"
              "document.getElementById('temperature').value = '0';"
              "document.getElementById('prompt').value = 'Hello there';"
              "document.getElementById('send').click();")
        dt.wait_for("document.getElementById('status').textContent === 'done'")
        got = dt.js("document.querySelector('.msg.assistant').firstChild.textContent")
        meta = dt.js("document.querySelector('.msg.assistant .meta').textContent")
        assert got == want
        assert meta.startswith("8 tokens")
        # a second turn sends the history along
        dt.js("document.getElementById('prompt').value = 'And again?'; document.getElementById('send').click();")
        dt.wait_for("document.querySelectorAll('.msg.assistant').length === 2 && "
                    "document.getElementById('status').textContent === 'done'")
        assert dt.js("document.querySelectorAll('.msg.user').length") == 2
    finally:
        dt.close()
