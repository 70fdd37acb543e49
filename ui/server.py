"""The real app (python app.py) in a subprocess on a free port, loopback only.

For the tests that drive the server (tests/test_app.py, test_browser, test_bad_input,
test_faults) and the benchmarks that time it (bench/bench_app.py, bench/load_test.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(tmp: Path, timeout: float = 180, env: dict | None = None):
    """Yield the URL of a freshly started app whose data and runs store live under tmp (env: more
    variables for it, such as settings; None removes one)."""
    extra = env or {}
    port = free_port()
    # Host and port through Gradio's own variables, as on a Space (COMPACT_HOST / COMPACT_PORT
    # would take precedence, so they are left out).
    env = {k: v for k, v in os.environ.items() if k not in ("COMPACT_HOST", "COMPACT_PORT")}
    env.update({"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                "COMPACT_DATA": str(tmp / "data"), "COMPACT_RUNS_DB": str(tmp / "runs.sqlite"),
                "GRADIO_ANALYTICS_ENABLED": "False", **extra})
    env = {k: v for k, v in env.items() if v is not None}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    start = time.time()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with {proc.returncode}: "
                                   f"{(tmp / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - start > timeout:
                raise RuntimeError("the app did not answer in time")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
