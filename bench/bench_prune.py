"""Minitron pruning on the default model: importance-pass overhead, trim time, and quality.

    .venv/bin/python -m bench.bench_prune [--device cpu] [--repeats 3] [--quality]

speed: tokens/s of a plain forward pass against the hooked importance pass on the same blocks
(128 x 1024 tokens on CUDA, 8 x 256 on a CPU; the issue's goal: at most 10% slower),
alternating the two so that load from other processes hits both alike, and the time to trim to
a smaller shape.
--quality adds validation perplexity (builtin data) at about 30% fewer parameters, before any
retraining: width-only against depth-only (BI and loss increase), activation importance against
random and weight-magnitude ranking, the head residual on or off, and the nine
batch x sequence aggregations. Results are saved after every step to bench/results/prune.json
(one entry per device), so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.common import device_name, sync, write_json
from compact import data, evaluate, importance, models, prune, search
from compact.arch import weight_oi


@torch.no_grad()
def plain_pass(model, blocks, batch):
    for i in range(0, len(blocks), batch):
        model(input_ids=blocks[i: i + batch], use_cache=False)


def wall(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time stays meaningful on a busy machine."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def speed(loaded, blocks, batch, repeats) -> dict:
    """Plain and hooked passes alternate, so load from other processes hits both alike;
    overheads are medians of the per-pair ratios, throughputs come from the best runs."""
    model, device = loaded.model, loaded.device
    blocks = blocks.to(device)
    tokens = blocks.numel()

    def run_plain():
        return plain_pass(model, blocks, batch)

    def run_hooked():
        return importance.estimate(model, blocks, batch_size=batch)

    run_plain(), run_hooked()  # warm-up
    pairs = [(wall(run_plain, device), wall(run_hooked, device)) for _ in range(repeats)]

    def median(xs):
        return sorted(xs)[len(xs) // 2]

    scores = importance.estimate(model, blocks, batch_size=batch)
    target = dict(heads=6, ffn=1024, hidden=480, layers=26)
    trim = min(wall(lambda: prune.trim(model, scores, **target), device)[0] for _ in range(repeats))
    return {"tokens": tokens, "batch": batch, "seq_len": blocks.shape[1], "repeats": repeats,
            "plain_tokens_per_s": tokens / min(p[0] for p, _ in pairs),
            "importance_tokens_per_s": tokens / min(h[0] for _, h in pairs),
            "importance_overhead_wall_median": median([h[0] / p[0] for p, h in pairs]) - 1,
            "importance_overhead_cpu_median": median([h[1] / p[1] for p, h in pairs]) - 1,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "trim_seconds": trim, "trim_target": target}


def magnitude_scores(model, like: importance.Scores) -> importance.Scores:
    """Weight-norm ranking: a head by its output-projection columns, a neuron by its up/gate
    rows and down column, a channel by its embedding column and norm weights."""
    from compact import arch as arch_mod

    a = arch_mod.for_model(model)
    s = a.shape(model.config)
    heads, neurons, per_layer = [], [], []
    for block in a.blocks(model):
        o = weight_oi(a.attn_out(block)).float()
        heads.append(o.view(o.shape[0], s.heads, s.head_dim).norm(dim=(0, 2)))
        down = weight_oi(a.mlp_out(block)).float().norm(dim=0)
        up = sum(weight_oi(m).float().norm(dim=1) for m in (block.mlp.up_proj, block.mlp.gate_proj))
        neurons.append(down * up)
        per_layer.append(sum(n.weight.float().abs() for n in a.block_norms(block)))
    per_layer = torch.stack(per_layer)
    channels = per_layer.sum(0) + a.final_norm(model).weight.float().abs() + \
        a.embed(model).weight.float().norm(dim=0)
    return importance.Scores(torch.stack(heads).cpu(), torch.stack(neurons).cpu(), channels.cpu(),
                             per_layer.cpu(), dict(like.layers), dict(like.meta))


def quality(loaded, calib, val, batch, keep: float, depth_blocks: int, out: dict, save) -> None:
    """Fills `out` step by step, most telling comparisons first, calling save() after each."""
    model, src = loaded.model, loaded.shape
    budget = int(keep * src.params)
    width = search.candidates(src, budget, 0.03, layers=[src.layers], min_fraction=0.4)[0]
    depth = search.candidates(src, budget, 0.05, hidden=[src.hidden], ffn=[src.ffn],
                              heads=[src.heads], min_fraction=0.3)[0]

    def ppl(m):
        return evaluate.perplexity(m, val, batch)["ppl"]

    wt = dict(layers=width.layers, hidden=width.hidden, ffn=width.ffn, heads=width.heads)

    def step(key, fn):
        start = time.perf_counter()
        out[key] = fn()
        print(f"{key}: {out[key]} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        save()

    out.update(budget_params=budget, width_shape=wt, width_params=width.params,
               depth_layers=depth.layers, depth_params=depth.params)
    step("base_ppl", lambda: ppl(model))
    start = time.perf_counter()
    scores = importance.estimate(model, calib, batch_size=batch)
    out["importance_seconds"] = time.perf_counter() - start
    step("width_ppl", lambda: ppl(prune.trim(model, scores, **wt)))
    g = torch.Generator().manual_seed(0)
    rand = importance.Scores(torch.rand(scores.heads.shape, generator=g),
                             torch.rand(scores.neurons.shape, generator=g),
                             torch.rand(scores.channels.shape, generator=g),
                             torch.zeros_like(scores.channels_per_layer), {"bi": scores.layers_bi},
                             dict(scores.meta))
    step("width_random_ppl", lambda: ppl(prune.trim(model, rand, **wt)))
    step("width_magnitude_ppl", lambda: ppl(prune.trim(model, magnitude_scores(model, scores), **wt)))
    step("depth_bi_ppl", lambda: ppl(prune.trim(model, scores, layers=depth.layers, depth_metric="bi")))
    # The loss-increase metric costs one pass per layer: a smaller share of the blocks.
    scores.layers_ppl = importance.layer_loss_increase(model, calib[:depth_blocks], batch)
    out["depth_ppl_blocks"] = min(depth_blocks, len(calib))
    step("depth_ppl_metric_ppl",
         lambda: ppl(prune.trim(model, scores, layers=depth.layers, depth_metric="ppl")))
    step("heads6_ppl", lambda: ppl(prune.trim(model, scores, heads=6)))
    step("heads6_head_residual_ppl", lambda: ppl(prune.trim(model, scores, heads=6, head_residual="query")))
    step("width_head_residual_ppl", lambda: ppl(prune.trim(model, scores, head_residual="query", **wt)))
    aggs = out.setdefault("width_ppl_by_aggregation", {"batch=l2,seq=mean": out["width_ppl"]})
    for b, q in [("mean", "mean"), ("l2", "l2"), ("var", "mean"), ("mean", "l2"), ("l2", "var"),
                 ("mean", "var"), ("var", "l2"), ("var", "var")]:
        s = importance.estimate(model, calib, b, q, batch_size=batch)
        aggs[f"batch={b},seq={q}"] = ppl(prune.trim(model, s, **wt))
        print(f"aggregation batch={b},seq={q}: {aggs[f'batch={b},seq={q}']}", file=sys.stderr, flush=True)
        save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default=None)
    # the proof issue's 128 x 1024 calibration tokens on a GPU; on a CPU a size it finishes
    ap.add_argument("--blocks", type=int, default=None, help="calibration blocks (CUDA 128, CPU 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per block (CUDA 1024, CPU 256)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--keep", type=float, default=0.7, help="fraction of parameters kept (quality)")
    ap.add_argument("--calib-blocks", type=int, default=16)
    ap.add_argument("--depth-blocks", type=int, default=4, help="blocks for the per-layer loss metric")
    ap.add_argument("--val-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune.json"))
    a = ap.parse_args()

    loaded = models.load(a.model, device=a.device)
    cuda = loaded.device.type == "cuda"
    a.blocks = a.blocks or (128 if cuda else 8)
    a.seq_len = a.seq_len or (1024 if cuda else 256)
    tok = loaded.tokenizer
    result = {"model": a.model, "device": device_name(loaded.device),
              "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(a.out)

    def save():
        previous = json.loads(out.read_text()) if out.exists() else {"runs": []}
        runs = previous.get("runs", [])
        mine = next((r for r in runs if r.get("device") == result["device"]), {})
        others = [r for r in runs if r is not mine]
        # Other devices are kept; on this device a speed-only run keeps the earlier quality part.
        write_json(out, {"runs": others + [{**mine, **result}]})

    blocks = data.blocks("builtin", tok, "calibration", a.blocks, a.seq_len)
    result["speed"] = speed(loaded, blocks, a.batch, a.repeats)
    print(json.dumps(result["speed"]), file=sys.stderr, flush=True)
    save()
    if a.quality:
        calib = data.blocks("builtin", tok, "calibration", a.calib_blocks, a.seq_len).to(loaded.device)
        val = data.blocks("builtin", tok, "validation", data.n_blocks_for(a.val_tokens, a.seq_len),
                          a.seq_len).to(loaded.device)
        result["quality"] = {"calib_blocks": len(calib), "val_tokens": int(val.numel()),
                             "seq_len": a.seq_len}
        quality(loaded, calib, val, a.batch, a.keep, a.depth_blocks, result["quality"], save)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
