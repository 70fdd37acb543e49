"""The app's responsiveness on the default model: cold start, each tab's click, the Prune readout.

    .venv/bin/python -m bench.bench_app [--out bench/results/app.json]

cold start: from spawning `python app.py` to the page answering (HTTP 200), then the first
Load of the default model through gradio_client. The clicks of one visitor, end to end through
the server, each with the tab's starting values for this device (compact.hardware.APP_SIZES):
importance twice (the first call also tokenizes the builtin corpus), prune to a fixed target
with those scores, distill the pruned model from the default one, the axis-ablation
experiment, each Sparsify method on the default model (one-shot magnitude, Wanda and
SparseGPT, and AST), and Compare of the default, pruned and distilled models. readout: the
Prune tab's size table and its keep/drop heatmaps for one target, in-process, per call.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import device_name, write_json
from ui.server import ROOT, serve


def serve_timed(tmp: Path):
    """Start the app and time it to the first HTTP 200 of the page."""
    start = time.perf_counter()
    ctx = serve(tmp)
    url = ctx.__enter__()
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    return ctx, url, time.perf_counter() - start


def tab_clicks(client) -> dict:
    """Prune, Distill, Experiments, Sparsify and Compare clicks with the tabs' starting values,
    after importance (its scores are the session's). Seconds each, keyed by what was asked."""
    from compact.distill import DistillConfig
    from compact.options import default
    from compact.sparsify import SparsifyConfig
    from ui.common import SIZES
    from ui.sparsify_tab import APP_SAMPLES

    d = functools.partial(default, DistillConfig)
    s = functools.partial(default, SparsifyConfig)
    clicks = {}
    t = time.perf_counter()
    pruned, _ = client.predict(24, 384, 1024, 6, "bi", api_name="/prune")
    clicks["prune to 24 layers, hidden 384, ffn 1024, 6 heads (s)"] = round(time.perf_counter() - t, 2)
    tokens, seq_len, batch = SIZES["train_tokens"], SIZES["train_seq_len"], SIZES["train_batch"]
    t = time.perf_counter()
    *_, distilled = client.predict("default", pruned["out"], "builtin", tokens, seq_len, batch, d("lr"),
                                   d("temperature"), d("kd_weight"), d("ce_weight"), d("hidden_weight"),
                                   False, api_name="/distill")
    clicks[f"distill the pruned model, {tokens:,} tokens in {batch} x {seq_len} (s)"] = \
        round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    client.predict("default", "axis-ablation", 0.8, SIZES["experiment_tokens"], 128, 4,
                   SIZES["experiment_samples"], SIZES["experiment_eval_tokens"], "builtin",
                   api_name="/experiment")
    clicks["axis-ablation experiment (s)"] = round(time.perf_counter() - t, 2)
    for method in ("magnitude", "wanda", "sparsegpt", "ast"):
        t = time.perf_counter()
        client.predict("default", method, s("pattern"), "builtin", APP_SAMPLES, s("seq_len"), tokens,
                       batch, s("lr"), s("slorb_k"), s("mask_interval"), s("mask_margin"), False,
                       api_name="/sparsify")
        size = (f"{tokens:,} tokens" if method == "ast"
                else "no data" if method == "magnitude" else f"{APP_SAMPLES}x{s('seq_len')}")
        clicks[f"sparsify {method}, {size} (s)"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    client.predict("default", pruned["out"], distilled["out"], None, "The capital of France is", 48, 0, 1.0,
                   0, False, True, api_name="/compare")
    clicks["compare default, pruned and distilled, 48 tokens with perplexity (s)"] = \
        round(time.perf_counter() - t, 2)
    return clicks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "app.json"))
    args = parser.parse_args()

    from gradio_client import Client

    from compact import importance, models
    from ui import importance_tab, prune_tab

    result: dict = {"device": device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        ctx, url, page_s = serve_timed(Path(tmp))
        try:
            client = Client(url, verbose=False)
            t = time.perf_counter()
            client.predict("default", api_name="/load")
            load_s = time.perf_counter() - t
            runs = []
            for _ in range(2):
                t = time.perf_counter()
                client.predict(None, "builtin", importance_tab.DEFAULT_SAMPLES,
                               importance_tab.DEFAULT_SEQ_LEN, "l2", "mean", False, api_name="/importance")
                runs.append(time.perf_counter() - t)
            clicks = tab_clicks(client)
        finally:
            ctx.__exit__(None, None, None)

    loaded = models.load("default")
    base = loaded.shape
    n = 200
    t = time.perf_counter()
    for i in range(n):
        prune_tab.readout(base, 30 - i % 10, 576 - 64 * (i % 3), 1536 - 128 * (i % 5), 9 - 3 * (i % 2))
    readout_ms = (time.perf_counter() - t) / n * 1e3
    from compact import data

    blocks = data.blocks("builtin", loaded.tokenizer, "calibration", 4, 64)
    scores = importance.estimate(loaded.model, blocks)
    state = {"ref": "default", "scores": scores, "outputs": []}
    t = time.perf_counter()
    for _ in range(5):
        prune_tab.heatmaps(state, base, 24, 384, 1024, 6, "bi")
    heatmaps_ms = (time.perf_counter() - t) / 5 * 1e3

    size = f"{importance_tab.DEFAULT_SAMPLES}x{importance_tab.DEFAULT_SEQ_LEN}"
    result["summary"] = {
        "cold start to page (s)": round(page_s, 2),
        "first model load through the app (s)": round(load_s, 2),
        f"importance {size}, first call (s)": round(runs[0], 2),
        f"importance {size}, second call (s)": round(runs[1], 2),
        **clicks,
        "prune readout per change (ms)": round(readout_ms, 3),
        "prune keep/drop heatmaps per change (ms)": round(heatmaps_ms, 1),
    }
    write_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
