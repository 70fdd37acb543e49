"""Why AST's mask updates hurt a quantized checkpoint: tied magnitudes inside groups of M.

    .venv/bin/python -m bench.ast_ties [--model default]
        [--out bench/results/experiments/ast-ties-default-cpu.json]

1. ties: the fraction of N:M groups whose N-th and (N+1)-th largest |W| are exactly equal, so the
   magnitude mask is an arbitrary choice among them;
2. noise: masks recomputed after adding Gaussian noise of a few sizes to the weights; flip rate
   and validation loss (unbiased tie-breaking);
3. training: AST for a few steps with masks held fixed, then the validation loss with the
   current masks against masks recomputed by plain magnitude and with a 5% margin (tie-breaking
   by the gradient, as a mask update does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import device_name, write_json
from compact import data, distill, evaluate, models, sparse_training, sparsity
from compact.arch import weight_oi


def tie_fraction(weights: dict[str, torch.Tensor], n: int = 2, m: int = 4) -> float:
    ties = groups = 0
    for w in weights.values():
        top = w.abs().reshape(w.shape[0], -1, m).sort(-1, descending=True).values
        ties += int((top[..., n - 1] == top[..., n]).sum())
        groups += top.shape[0] * top.shape[1]
    return ties / groups


def flips(masks: dict, base: dict) -> float:
    return sum(int((masks[k] != base[k]).sum()) for k in base) / sum(v.numel() for v in base.values())


@torch.no_grad()
def loss_with(model, linears, dense, masks, val) -> float:
    for name, mod in linears.items():
        weight_oi(mod).copy_(dense[name] * masks[name])
    return evaluate.loss_on(model, val)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=2, help="AST steps before recomputing the masks")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "experiments" /
                                        "ast-ties-default-cpu.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    loaded = models.load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    val = data.blocks("builtin", tok, "validation", 8, 256)
    linears = sparsity.target_linears(model)
    dense = {k: weight_oi(m).detach().clone() for k, m in linears.items()}
    base = {k: sparsity.nm_mask(w) for k, w in dense.items()}
    result = {"model": args.model, "device": device_name(), "val_tokens": val.numel(),
              "tie_fraction_of_groups": tie_fraction(dense),
              "magnitude_loss": loss_with(model, linears, dense, base, val), "noise": []}
    for scale in (1e-4, 1e-3):
        masks = {k: sparsity.nm_mask(w + scale * torch.randn_like(w)) for k, w in dense.items()}
        result["noise"].append({"std": scale, "flip_rate": flips(masks, base),
                                "loss": loss_with(model, linears, dense, masks, val)})
    print(json.dumps(result), flush=True)
    with torch.no_grad():  # the dense model again: it is the teacher below
        for name, mod in linears.items():
            weight_oi(mod).copy_(dense[name])

    # a short AST run with the masks held fixed (interval beyond the run), then recompute them
    student = models.load(args.model)
    cfg = sparse_training.AstConfig(model=args.model, out=tempfile.mkdtemp(prefix="ast-ties-"),
                                    tokens=args.steps * 2 * 256, seq_len=256, batch=2,
                                    mask_interval=10 ** 6, eval_tokens=0, checkpoint_every=0)
    hooks = sparse_training.AstHooks(cfg)
    trained: dict[str, torch.Tensor] = {}

    def keep_dense(event):  # the dense W after the last step, before finalize zeroes the pruned ones
        if event.get("kind") == "step" and event["step"] == event["steps"]:
            trained.update({k: weight_oi(m).detach().clone() for k, m in hooks.linears.items()})

    distill.run(sparse_training.distill_config(cfg), hooks=hooks, on_event=keep_dense, teacher=loaded,
                student=student)
    shutil.rmtree(cfg.out, ignore_errors=True)
    s_linears = sparsity.target_linears(student.model)
    rows = {"current masks": hooks.initial}
    rows["recomputed, plain magnitude"] = {k: sparsity.nm_mask(w) for k, w in trained.items()}
    rows["recomputed, 5% margin"] = {k: sparsity.nm_mask(w.abs() * (1 + 0.05 * hooks.initial[k]))
                                     for k, w in trained.items()}
    result["after_training"] = {"steps": args.steps, "rows": [
        {"masks": label, "flip_rate": flips(masks, hooks.initial),
         "loss": loss_with(student.model, s_linears, trained, masks, val)} for label, masks in rows.items()]}
    write_json(args.out, result)
    print(json.dumps(result["after_training"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
