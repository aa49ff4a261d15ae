#!/usr/bin/env python3
"""Drives web/dist/ in headless Chromium (WebGPU on SwiftShader) over the DevTools
protocol: the page must train a backdoored MNIST classifier, fit Mahalanobis and show
AUROC >= --min-auroc; a WGSL syntax error typed into the kernel panel must show its
file:line:column, and a wrong column sum must fail its f64-reference checks. Saves a full-page screenshot and prints the page's figures as JSON.

--dump-dom returns before GPU readbacks finish, hence the protocol (websocket-client).
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket  # pip: websocket-client (Debian: python3-websocket)

CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--enable-features=Vulkan",
    "--use-vulkan=swiftshader", "--use-webgpu-adapter=swiftshader", "--window-size=1100,1400",
    "--no-first-run", "--no-default-browser-check",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=60)
        self.next_id = 0
        self.console = []

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.consoleAPICalled":
                args = msg["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(msg["params"]["exceptionDetails"])[:500])
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_state(self, states, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.eval("document.body ? document.body.dataset.state : 'navigating'")
            if s in states:
                return s
            time.sleep(0.5)
        status = self.eval("document.getElementById('status').textContent")
        raise TimeoutError(f"page state still {s!r} after {timeout} s; status: {status}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dist", default=os.path.join(os.path.dirname(__file__), "dist"))
    ap.add_argument("--screenshot", default="web-page.png")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    # A corner pixel needs ~20 000 images x 3 epochs before Mahalanobis sees it; the
    # noise trigger shows in one small epoch.
    ap.add_argument("--trigger", default="noise", choices=["corner", "noise", "wanet"])
    ap.add_argument("--detector", default="mahalanobis", choices=["mahalanobis", "que", "spectral"])
    ap.add_argument("--min-auroc", type=float, default=0.95)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("test_page.py: no chromium on PATH (apt-get install chromium)")

    http_port, debug_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(http_port), "-d", args.dist],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = tempfile.mkdtemp(prefix="cupbearer-chromium-")
    browser = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--remote-debugging-port={debug_port}",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    page = None
    try:
        targets = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json") as r:
                    targets = [t for t in json.load(r) if t["type"] == "page"]
                if targets:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        if not targets:
            raise RuntimeError("chromium's DevTools endpoint never came up")
        page = Page(targets[0]["webSocketDebuggerUrl"])
        page.call("Runtime.enable")
        page.call("Page.enable")
        url = (f"http://127.0.0.1:{http_port}/?auto=1&train={args.train}&test={args.test}"
               f"&epochs={args.epochs}&trigger={args.trigger}&detector={args.detector}")
        start = time.time()
        page.call("Page.navigate", url=url)
        state = page.wait_state({"done", "error"}, args.timeout)
        seconds = time.time() - start
        text = lambda id: page.eval(f"(document.getElementById({id!r}) || {{}}).textContent")
        if state == "error":
            raise AssertionError(f"the page reports an error: {text('error')}")
        auroc = float(text("auroc"))
        figures = {
            "adapter": text("adapter"), "train_result": text("train-result"),
            "detect_result": text("detect-result"), "auroc": auroc,
            "step_ms": float(text("step-ms")), "pipeline_seconds": round(seconds, 1),
        }
        assert auroc >= args.min_auroc, f"AUROC {auroc} < {args.min_auroc}: {figures}"

        # A syntax error on line 3 of matmul.wgsl must come back with its position.
        page.eval("""(() => {
            const k = document.getElementById('kernel');
            k.value = 'matmul'; k.dispatchEvent(new Event('change'));
            const src = document.getElementById('source');
            const lines = src.value.split('\\n');
            lines.splice(2, 0, 'fn broken( {');
            src.value = lines.join('\\n');
            document.getElementById('check').click();
        })()""")
        message = text("kernel-message")
        figures["kernel_error"] = message.splitlines()[0] if message else message
        assert re.search(r"matmul\.wgsl \(edited\):3:\d+: ", message), \
            f"no file:line:col message for the injected error: {message!r}"
        assert page.eval("document.getElementById('kernel-message').className") == "bad"

        # The edited file's f64-reference checks: a wrong column sum must fail them,
        # the reverted file must pass them.
        def reference_checks(edit_js):
            page.eval("""(() => {
                const k = document.getElementById('kernel');
                k.value = 'reduce'; k.dispatchEvent(new Event('change'));
                const src = document.getElementById('source');
                %s
                document.getElementById('references').click();
            })()""" % edit_js)
            if page.wait_state({"idle", "error"}, args.timeout) == "error":
                raise AssertionError(f"reference checks: {text('error')}")
            failed = int(page.eval("document.getElementById('kernel-message').dataset.failed"))
            return failed, text("kernel-message")
        failed, line = reference_checks(
            "src.value = src.value.replace('params.scale * s;', 'params.scale * s + 1.0;');")
        assert failed > 0, f"a wrong column sum passed its reference checks: {line}"
        figures["broken_reduce"] = line.splitlines()[0]
        failed, line = reference_checks("document.getElementById('revert').click();")
        assert failed == 0, f"the built-in reduce.wgsl fails its reference checks: {line}"
        figures["builtin_reduce"] = line.splitlines()[0]

        shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        with open(args.screenshot, "wb") as f:
            import base64
            f.write(base64.b64decode(shot["data"]))
        figures["screenshot"] = args.screenshot
        print(json.dumps(figures, indent=1))
    except BaseException:
        if page is not None:
            print("page console:\n  " + "\n  ".join(page.console[-30:]), file=sys.stderr)
        raise
    finally:
        browser.terminate()
        server.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
