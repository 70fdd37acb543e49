"""Debian's Chromium, headless, drives the real app by clicking: load, importance, prune, compare.

Chromium is driven through the DevTools protocol over a pipe (--remote-debugging-pipe: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so nothing but the standard
library and the browser is needed, and nothing downloads a browser.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import FAST_SCORES, ROOT
from ui.server import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "out" / "test_browser"

pytestmark = [pytest.mark.app, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(make browser installs it as root); the browser test needs it")]


class Browser:
    """Just enough of the DevTools protocol: evaluate JavaScript, wait, take screenshots."""

    def __init__(self, url: str, width: int = 1400, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        cmd_r, cmd_w = os.pipe()  # we write commands, chromium reads fd 3
        res_r, res_w = os.pipe()  # chromium writes fd 4, we read

        def child_fds():  # in the child: the pipe ends become fds 3 and 4, kept across exec
            a, b = os.dup(cmd_r), os.dup(res_w)  # first out of the way of 3 and 4
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
             f"--window-size={width},{height}", url],
            preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self.out, self.inp = os.fdopen(cmd_w, "wb"), os.fdopen(res_r, "rb")
        self.next_id, self.buffer = 0, b""
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        attached = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        self.session = attached["sessionId"]
        self.call("Runtime.enable", session=True)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.out.write(json.dumps(msg).encode() + b"\0")
        self.out.flush()
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.inp.fileno(), 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 120, what: str = "") -> object:
        end = time.time() + timeout
        guarded = f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()"
        while time.time() < end:
            value = self.js(guarded)
            if value:
                return value
            time.sleep(0.25)
        self.screenshot(SHOTS / "timeout.png")
        raise AssertionError(f"timed out waiting for {what or expression}")

    def click_button(self, text: str) -> None:
        """Click a visible action button (not a tab, nor the tab overflow menu's copy)."""
        assert self.js(f"""(() => {{
            const b = [...document.querySelectorAll('button')].find(
                b => b.offsetParent !== null && b.getAttribute('role') !== 'tab' && b.tabIndex !== -1
                     && b.textContent.trim() === {json.dumps(text)});
            if (b) b.click();
            return !!b; }})()"""), f"no visible button '{text}'"

    def click_tab(self, text: str) -> None:
        assert self.js(f"""(() => {{
            const t = [...document.querySelectorAll('button[role=tab]')].find(
                t => t.textContent.trim() === {json.dumps(text)});
            if (t) t.click();
            return !!t; }})()"""), f"no tab '{text}'"

    def set_number(self, elem_id: str, value: float) -> None:
        """Type a value into a Number or Slider component's number box."""
        assert self.js(f"""(() => {{
            const el = document.querySelector('#{elem_id} input[type=number]');
            if (!el) return false;
            el.value = {json.dumps(str(value))};
            el.dispatchEvent(new Event('input', {{bubbles: true}}));
            el.dispatchEvent(new Event('change', {{bubbles: true}}));
            el.dispatchEvent(new Event('blur', {{bubbles: true}}));
            return true; }})()"""), f"no number input in #{elem_id}"

    def mouse_click(self, selector: str) -> None:
        """A real mouse click (move, press, release) at the centre of the element."""
        box = self.js(f"""(() => {{
            const el = {selector};
            if (!el) return null;
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        assert box, f"nothing at {selector}"
        x, y = box
        self.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x, y=y)
        time.sleep(0.3)  # Plotly's hover, which its click reports, follows the move
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left",
                      clickCount=1)

    def text(self, selector: str) -> str:
        return self.js(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shot = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("browser-app"), env=FAST_SCORES) as url:
        b = Browser(url)
        try:
            yield b
        finally:
            b.close()


def heatmap_drawn(elem_id: str) -> str:
    """True once Plotly has drawn a heatmap trace inside the component."""
    return (f"document.querySelectorAll('#{elem_id} .js-plotly-plot .hm, #{elem_id} .heatmaplayer image')"
            ".length > 0")


def test_main_flow_by_clicking(browser):
    b = browser
    b.wait("document.body.innerText.includes('shrink a language model')", 60, "the page")
    for tab in ("Start", "Model", "Importance", "Prune", "Sparsify", "Distill", "Compare", "Export"):
        assert b.js("[...document.querySelectorAll('button[role=tab]')]"
                    f".some(t => t.textContent.trim() === '{tab}')"), tab
    b.screenshot(SHOTS / "01-page.png")

    # the start view explains the flow, and its first step's button opens the Model tab
    assert "Minitron" in b.text("body") and "AST" in b.text("body")
    b.click_button("1 · Model")
    b.wait("[...document.querySelectorAll('button')].some(x => x.offsetParent !== null "
           "&& x.textContent.trim() === 'Load')", 20, "the model tab")
    b.click_button("Load")
    b.wait("document.body.innerText.includes('134.52 M')", 120, "the model card")

    b.click_tab("Importance")
    b.wait("document.querySelector('#imp-samples input') !== null", 20, "the importance tab")
    b.set_number("imp-samples", 4)
    b.set_number("imp-seq-len", 64)
    b.click_button("Estimate importance")
    b.wait(heatmap_drawn("imp-heads"), 180, "the heads heatmap")
    b.wait(heatmap_drawn("imp-neurons"), 30, "the neurons heatmap")
    assert "Scores saved" in b.text("#imp-status")
    b.screenshot(SHOTS / "02-importance.png")

    b.click_tab("Prune")
    b.wait("document.querySelector('#prune-layers input[type=number]') !== null", 20, "the prune tab")
    b.wait("document.body.innerText.includes('FLOPs / token')", 60, "the size readout of the model")
    b.set_number("prune-layers", 24)
    b.set_number("prune-ffn", 1024)
    b.wait("document.body.innerText.includes('24, 576, 1024, 9')", 20, "the size readout")
    b.click_button("Prune")
    b.wait("document.querySelector('#prune-status').innerText.includes('Pruned to')", 180, "the pruned model")
    b.wait(heatmap_drawn("prune-neurons"), 30, "the keep/drop heatmap")
    b.screenshot(SHOTS / "03-prune.png")

    b.click_tab("Compare")
    b.wait("document.querySelector('#cmp-max-new input[type=number]') !== null", 20, "the compare tab")
    b.set_number("cmp-max-new", 8)
    b.click_button("Generate")
    both = ("['#cmp-text-0 textarea', '#cmp-text-1 textarea'].every("
            "s => document.querySelector(s) && document.querySelector(s).value.trim().length > 0)")
    b.wait(both, 180, "two generations")
    b.wait("document.querySelector('#cmp-speed-1').innerText.includes('tokens/s')", 180, "the speeds")
    b.wait("document.querySelector('#cmp-table').innerText.includes('pruned-1')", 180, "the table")
    original = b.js("document.querySelector('#cmp-text-0 textarea').value")
    assert "Paris" in original  # greedy SmolLM2 knows the capital of France
    shot = b.screenshot(SHOTS / "04-compare.png")
    assert shot.stat().st_size > 10_000
    print(f"screenshots in {SHOTS}")


def test_workspace_views_by_clicking(browser):
    """After the flow above: the pickers name models (not paths), the lineage tree shows the root
    and the pruned model with their canonical perplexities, and a click on a Pareto point picks
    that model for Compare."""
    b = browser
    b.click_tab("Sparsify")
    b.wait("document.querySelector('#sparsify-model input') !== null", 20, "the sparsify model picker")
    b.js("document.querySelector('#sparsify-model input').focus()")
    b.js("document.querySelector('#sparsify-model input').click()")
    option = b.wait("[...document.querySelectorAll('ul[role=listbox] li')].map(li => li.innerText)"
                    ".find(t => t.startsWith('pruned-1 · pruned · 24L'))", 20, "the pruned model as a choice")
    assert "ppl " in option and "/" not in option  # a name, its size and score; no path
    b.js("document.activeElement.blur()")

    b.click_tab("Export")
    runs = "(document.querySelector('#runs-acc .label-wrap') || document.querySelector('#runs-acc button'))"
    b.wait(f"!!{runs}", 20, "the runs accordion's label")
    b.js(f"{runs}.click()")
    b.wait("[...document.querySelectorAll('button')].some(x => x.offsetParent && x.innerText.trim() === "
           "'Lineage')", 20, "the runs accordion")
    b.click_button("Lineage")
    tree = b.wait("(t => t.includes('(root)') && t)(document.querySelector('#lineage').innerText)", 60,
                  "the lineage tree")
    assert "default (root) · ppl " in tree and "pruned-1" in tree.split("(root)")[1]
    b.click_button("Pareto view")
    points = "#pareto-plot .js-plotly-plot .scatterlayer .trace:first-child .point"
    b.wait(f"document.querySelectorAll('{points}').length >= 2", 60, "the Pareto points")
    b.screenshot(SHOTS / "05-pareto.png")
    index = b.js("document.querySelector('#pareto-plot .js-plotly-plot')._fullData[0].customdata"
                 ".findIndex(r => r.endsWith('/pruned-1'))")
    assert index >= 0
    b.mouse_click(f"document.querySelectorAll('{points}')[{index}]")
    b.wait("document.querySelector('#pareto-note').innerText.includes('Picked pruned-1')", 30,
           "the pick's confirmation")
    b.click_tab("Compare")
    b.wait("(document.querySelector('#cmp-slot-1 input') || {}).value.includes('pruned-1')", 20,
           "the picked model in Compare's first slot")


def type_text(b: Browser, elem_id: str, text: str) -> None:
    """Type into a Textbox (a textarea, or an input for a password)."""
    assert b.js(f"""(() => {{
        const el = document.querySelector('#{elem_id} textarea, #{elem_id} input');
        if (!el) return false;
        el.value = {json.dumps(text)};
        el.dispatchEvent(new Event('input', {{bubbles: true}}));
        el.dispatchEvent(new Event('change', {{bubbles: true}}));
        return true; }})()"""), f"no text box in #{elem_id}"


@pytest.fixture
def challenge_browser(tmp_path, monkeypatch):
    """A server of its own with a host password and a short held-out evaluation."""
    monkeypatch.setenv("COMPACT_CHALLENGE_PASSWORD", "host-secret")
    monkeypatch.setenv("COMPACT_CHALLENGE_TOKENS", "64K")
    monkeypatch.setenv("COMPACT_EVAL_TOKENS", "512")
    monkeypatch.delenv("COMPACT_CHALLENGE_BUDGET", raising=False)
    with serve(tmp_path) as url:
        b = Browser(url)
        try:
            yield b
        finally:
            b.close()


def test_challenge_as_a_participant(challenge_browser):
    """From the start view to the leaderboard: a host sets a budget the default model is over (the
    submission is refused), then one it fits; the participant's nickname reaches the board."""
    b = challenge_browser
    b.wait("document.body.innerText.includes('shrink a language model')", 60, "the page")
    b.click_button("Challenge")
    b.wait("document.querySelector('#challenge-nickname') && "
           "document.querySelector('#challenge-nickname').offsetParent !== null", 20, "the challenge tab")
    b.wait("document.querySelector('#challenge-rules').innerText.includes('64,000 tokens')", 20, "the rules")
    type_text(b, "challenge-nickname", "ada lovelace")

    def host(budget: int) -> None:
        shown = "(e => !!e && e.offsetParent !== null)(document.querySelector('#challenge-password input'))"
        if not b.js(shown):
            b.js("(document.querySelector('#challenge-host .label-wrap') || "
                 "document.querySelector('#challenge-host button')).click()")
            b.wait(shown, 20, "the host view")
            b.wait("document.querySelector('#challenge-tokens textarea').value === '64K'", 20,
                   "the current challenge in the host's fields")
        type_text(b, "challenge-password", "host-secret")
        type_text(b, "challenge-budget", str(budget))
        b.click_button("Set the challenge")
        b.wait(f"document.querySelector('#challenge-rules').innerText.includes('{budget:,} parameters')", 30,
               "the new budget in the rules")

    host(100_000_000)
    b.click_button("Submit to the leaderboard")
    b.wait("document.body.innerText.includes(\"over the challenge's budget of 100,000,000\")", 90,
           "the refusal")
    b.screenshot(SHOTS / "challenge-01-refused.png")

    host(150_000_000)
    assert "64,000 tokens" in b.text("#challenge-rules")  # the environment's token budget stays
    b.click_button("Submit to the leaderboard")
    b.wait("document.querySelector('#challenge-status').innerText.includes('rank 1')", 120, "the submission")
    status = b.text("#challenge-status")
    assert "ada lovelace" in status and "held-out perplexity" in status
    board = b.wait("(t => t.includes('ada lovelace') && t)"
                   "(document.querySelector('#challenge-board').innerText)", 30, "the nickname on the board")
    assert "default" in board and "134.52 M" in board
    b.screenshot(SHOTS / "challenge-02-board.png")

    # a reload is a new session: the nickname comes back from the browser, the board from the store
    b.js("window.oldPage = true")
    b.call("Page.reload", session=True)
    b.wait("!window.oldPage && [...document.querySelectorAll('button')].some(x => x.offsetParent !== null "
           "&& x.textContent.trim() === 'Challenge' && x.getAttribute('role') !== 'tab')", 60,
           "the start view again")
    b.click_button("Challenge")
    b.wait("document.querySelector('#challenge-nickname textarea').value === 'ada lovelace'", 20,
           "the nickname kept by the browser")
    b.wait("document.querySelector('#challenge-board').innerText.includes('ada lovelace')", 20,
           "the leaderboard after a reload")
