"""Which importance metric finds the heads that matter? Metrics against the ablation truth.

    .venv/bin/python -m bench.metric_validation [--calib-blocks 16] [--truth-blocks 4] [--seq-len 128]

On the default model (SmolLM2-135M, 9 heads in 3 KV groups per layer): every head metric of
compact.metrics (and Minitron's activation score) is scored by its Spearman correlation with the
ablation truth (compact.validation: the calibration-loss increase when that head alone is
removed), and by the validation perplexity after pruning heads 9 -> 6 with it (no retraining),
against keeping the *lowest*-scored heads, random choices (several seeds) and the truth itself.
Then the head residual's modes (off, query, output) on the activation ranking, and the same
check for layers (Block Influence, angular distance) and samples of neurons and channels.
Results are written after every step to bench/results/metric-validation.json.
--distill-tokens N instead distills each 6-head model (activation, activation_out, and the
activation ranking with each head residual) from the original for N tokens (compact.distill,
logit KD) and writes the perplexity before and after to metric-validation-distill.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.common import device_name, write_json
from compact import data, evaluate, importance, metrics, models, prune, validation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--calib-blocks", type=int, default=16, help="blocks for every metric")
    ap.add_argument("--truth-blocks", type=int, default=4, help="of those, blocks for the ablation truth")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--val-tokens", type=int, default=2048)
    ap.add_argument("--val-seq-len", type=int, default=256)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=5, help="random head choices")
    ap.add_argument("--sample", type=int, default=32, help="neurons and channels checked")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--distill-tokens", type=int, default=0)
    ap.add_argument("--truth-only", action="store_true", help="skip the pruned perplexities but the truth's")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "metric-validation.json"))
    a = ap.parse_args()
    if a.distill_tokens:
        a.out = a.out.replace(".json", "-distill.json")

    loaded = models.load(a.model)
    model, tok = loaded.model, loaded.tokenizer
    calib = data.blocks("builtin", tok, "calibration", a.calib_blocks, a.seq_len)
    truth_blocks = calib[:a.truth_blocks]
    val = data.blocks("builtin", tok, "validation", data.n_blocks_for(a.val_tokens, a.val_seq_len),
                      a.val_seq_len)
    out = {"model": a.model, "device": device_name(loaded.device), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "calibration": {"blocks": len(calib), "seq_len": a.seq_len, "data": "builtin"},
           "truth": {"blocks": len(truth_blocks), "seq_len": a.seq_len},
           "validation_tokens": int(val.numel()), "heads_target": a.heads}

    def save():
        write_json(a.out, out)

    def step(key, fn, into=out):
        start = time.perf_counter()
        into[key] = fn()
        into.setdefault("seconds", {})[key] = round(time.perf_counter() - start, 1)
        print(f"{key}: {into[key]} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        save()

    def ppl(m):
        return evaluate.perplexity(m, val, a.batch)["ppl"]

    if not (a.distill_tokens or a.truth_only):
        step("base_ppl", lambda: ppl(model))
    scores = importance.estimate(model, calib, batch_size=a.batch)
    scores.metrics = metrics.extra(model, calib, batch_size=a.batch)
    if a.distill_tokens:
        return distill_each(a, loaded, scores, out, save)

    def pruned_ppl(heads_scores, residual="off"):
        s = importance.Scores(heads_scores, scores.neurons, scores.channels, scores.channels_per_layer,
                              dict(scores.layers), dict(scores.meta))
        return ppl(prune.trim(model, s, heads=a.heads, head_residual=residual))

    names = list(metrics.WIDTH_METRICS["heads"])
    heads_ppl = out.setdefault("heads_ppl", {})
    for name in [] if a.truth_only else names:
        step(name, lambda n=name: pruned_ppl(scores.width("heads", n)), heads_ppl)
    if not a.truth_only:
        step("activation_lowest_kept", lambda: pruned_ppl(-scores.heads), heads_ppl)
    randoms = []
    for seed in range(0 if a.truth_only else a.seeds):
        g = torch.Generator().manual_seed(seed)
        randoms.append(pruned_ppl(torch.rand(scores.heads.shape, generator=g)))
        heads_ppl["random"] = {"seeds": randoms, "median": sorted(randoms)[len(randoms) // 2],
                               "min": min(randoms), "max": max(randoms)}
        save()
    residual = out.setdefault("head_residual_ppl", {})
    for mode in () if a.truth_only else ("query", "output"):
        step(mode, lambda m=mode: pruned_ppl(scores.heads, m), residual)
    residual["off"] = heads_ppl.get("activation")

    # The truth for every head, then how each metric ranks against it.
    spearman = out.setdefault("spearman", {})
    start = time.perf_counter()
    heads_index = validation.units("heads", scores, 0)
    truth = validation.truth(model, truth_blocks, "heads", heads_index, a.batch,
                             progress=lambda f, m: print(m, file=sys.stderr, flush=True))
    out.setdefault("seconds", {})["heads_truth"] = round(time.perf_counter() - start, 1)
    truth = truth.view_as(scores.heads)
    out["heads_truth"] = truth.tolist()
    spearman["heads"] = {n: validation.spearman(scores.width("heads", n), truth) for n in names}
    spearman["heads"]["activation_lowest"] = validation.spearman(-scores.heads, truth)
    group = scores.heads.shape[1] // loaded.shape.kv_heads
    # Inside each KV group pruning drops the lowest heads: how often a metric drops the truth's.
    # Pruning ranks heads only inside each KV group: the mean Spearman over the groups.
    by_group = out.setdefault("heads_group_spearman", {})
    for n in names:
        pairs = zip(scores.width("heads", n).view(-1, group), truth.view(-1, group), strict=True)
        by_group[n] = sum(validation.spearman(m, t) for m, t in pairs) / truth.view(-1, group).shape[0]
    agree = out.setdefault("heads_dropped_as_truth", {})
    drop = group - a.heads // loaded.shape.kv_heads
    truth_drop = truth.view(-1, group).argsort(dim=1)[:, :drop].sort().values
    for n in names:
        mine = scores.width("heads", n).view(-1, group).argsort(dim=1)[:, :drop].sort().values
        agree[n] = float((mine == truth_drop).all(1).float().mean())
    save()
    step("truth", lambda: pruned_ppl(truth), heads_ppl)

    # Layers and samples of neurons and channels.
    for axis, sample in (("layers", 0), ("neurons", a.sample), ("channels", a.sample)):
        start = time.perf_counter()
        index = validation.units(axis, scores, sample, seed=0)
        loss = validation.truth(model, truth_blocks, axis, index, a.batch)
        out["seconds"][f"{axis}_truth"] = round(time.perf_counter() - start, 1)
        spearman[axis] = {n: validation.spearman(v, loss)
                          for n, v in validation.metric_values(axis, scores, index).items()}
        spearman[axis]["units"] = len(index)
        print(f"{axis}: {spearman[axis]}", file=sys.stderr, flush=True)
        save()
    print(out)


def distill_each(a, loaded, scores, out, save) -> None:
    """Prune heads 9 -> 6 several ways, distill each from the original for a few tokens."""
    import tempfile

    from compact import distill

    out["distill"] = {"tokens": a.distill_tokens, "seq_len": a.val_seq_len, "batch": 2, "lr": 1e-4,
                      "warmup_steps": 1, "loss": "KL(teacher||student), T = 1"}
    runs = out.setdefault("runs", {})
    for name, metric, residual in (("activation", "activation", "off"),
                                   ("activation_out", "activation_out", "off"),
                                   ("activation+query_residual", "activation", "query"),
                                   ("activation+output_residual", "activation", "output"),
                                   ("taylor", "taylor", "off")):
        start = time.perf_counter()
        pruned = prune.trim(loaded.model, scores.using(heads=metric), heads=a.heads, head_residual=residual)
        student = models.Loaded(model=pruned, tokenizer=loaded.tokenizer, arch=loaded.arch, ref=name)
        cfg = distill.DistillConfig(teacher=a.model, student=name, out=tempfile.mkdtemp(prefix="mv-distill-"),
                                    data="builtin", tokens=a.distill_tokens, seq_len=a.val_seq_len, batch=2,
                                    warmup_steps=1, checkpoint_every=0, eval_tokens=a.val_tokens)
        result = distill.run(cfg, teacher=loaded, student=student)
        runs[name] = {"ppl_before": result["val_ppl_before"], "ppl_after": result["val_ppl_after"],
                      "steps": result.get("steps"), "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: {runs[name]}", file=sys.stderr, flush=True)
        save()


if __name__ == "__main__":
    main()
