"""Dense against 2:4 semi-structured kernels: single linears, model prefill and decode.

    .venv/bin/python -m bench.bench_sparse [--device cuda] [--model REF] [--out bench/results/sparse.json]

layers: F.linear with a dense weight against the same 2:4 weight converted by
torch.sparse.to_sparse_semi_structured, with cuSPARSELt's default algorithm and with the one
torch._cslt_sparse_mm_search picks, at decode (1 token) and prefill token counts; shapes of the
default model (576 wide) and of an 8B model (4096 wide).
model: the default model pruned 2:4 by magnitude, prefill at several batch sizes and greedy
decode, dense weights against converted ones (compact.sparsity.to_semi_structured).
training: AST's training step against a dense distillation step of the same model, as
compact's loop takes them (teacher forward, the student's forward and backward with AST's loss
mix, optimizer step; fp32 master weights, autocast on CUDA): dense (AdamW), AST (the masked
forward with its straight-through backward, AstAdamW with the decay of pruned weights at its
full strength) and AST + SLoRB (k = 16), alternating step by step; and the mask update AST runs
every --mask-interval steps, timed apart and spread over that interval in `ast_amortized`.
The 2:4 kernels need CUDA; on a CPU the script records that and still measures the dense
baselines, so the JSON always says what ran where. Speedups above 1 mean 2:4 is faster. The file
is written before the training part too, so a run stopped there keeps the rest.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import device_name, sync, write_json
from compact import data, distill, hardware, models, sparse_training, sparsity, train

SMALL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]   # default model: q/o, k/v, up/gate, down
LARGE = [(4096, 4096), (14336, 4096), (4096, 14336)]          # an 8B model



def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _pruned(out_f: int, in_f: int, device, dtype) -> torch.Tensor:
    w = torch.randn(out_f, in_f, device=device, dtype=dtype)
    return w * sparsity.nm_mask(w, 2, 4).to(dtype)


@torch.no_grad()
def bench_layers(device, dtype, shapes, token_counts, repeats, sparse_ok) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for out_f, in_f in shapes:
        w = _pruned(out_f, in_f, device, dtype)
        for tokens in token_counts:
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            row = {"out": out_f, "in": in_f, "tokens": tokens,
                   "dense_ms": timed(lambda x=x, w=w: F.linear(x, w), device, repeats)}
            if sparse_ok:
                try:
                    ws = to_sparse_semi_structured(w)
                    row["sparse_ms"] = timed(lambda x=x, ws=ws: F.linear(x, ws), device, repeats)
                    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
                    alg = sparsity.cslt_search(w, tokens)
                    row["cslt_alg_id"] = alg
                    if alg:
                        wa = to_sparse_semi_structured(w, alg_id=alg)
                        row["sparse_search_ms"] = timed(lambda x=x, wa=wa: F.linear(x, wa), device, repeats)
                        row["speedup_search"] = row["dense_ms"] / row["sparse_search_ms"]
                except (RuntimeError, NotImplementedError) as e:
                    row["sparse_error"] = str(e).splitlines()[0][:200]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def prefill_ms(model, batch: int, seq_len: int, vocab: int, device, repeats: int) -> float:
    ids = torch.randint(0, vocab, (batch, seq_len), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    return timed(lambda: model(input_ids=ids, use_cache=False), device, repeats, warmup=1)


@torch.no_grad()
def decode_tokens_per_s(model, tokenizer, new_tokens: int, device) -> float:
    ids = tokenizer("The history of", return_tensors="pt").input_ids.to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{**kwargs, "max_new_tokens": 4,
                                                                           "min_new_tokens": 4})
    sync(device)
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(device)
    return new_tokens / (time.perf_counter() - start)


def bench_model(ref, device, dtype, batches, seq_len, new_tokens, repeats, sparse_ok,
                search_tokens) -> dict:
    loaded = models.load(ref, device=str(device), dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    sparsity.one_shot(model, "magnitude")
    vocab = loaded.shape.vocab
    out = {"model": f"{ref}, magnitude 2:4", "dtype": str(dtype).replace("torch.", ""),
           "seq_len": seq_len, "prefill": [], "decode": {"new_tokens": new_tokens}}
    dense_prefill = {b: prefill_ms(model, b, seq_len, vocab, device, repeats) for b in batches}
    out["decode"]["dense_tokens_per_s"] = decode_tokens_per_s(model, tok, new_tokens, device)
    variants = {}
    if sparse_ok:
        for label, search in (("sparse", 0), ("sparse_search", search_tokens)):
            sparse_model = copy.deepcopy(model)
            try:
                conv = sparsity.to_semi_structured(sparse_model, search_tokens=search)
                variants[label] = (sparse_model, conv)
            except Exception as e:  # report, do not hide: the table says what failed
                out[f"{label}_error"] = str(e).splitlines()[0][:200]
    for b in batches:
        row = {"batch": b, "tokens": b * seq_len, "dense_ms": dense_prefill[b]}
        for label, (m, _) in variants.items():
            try:
                row[f"{label}_ms"] = prefill_ms(m, b, seq_len, vocab, device, repeats)
                row[f"{label}_speedup"] = row["dense_ms"] / row[f"{label}_ms"]
            except Exception as e:
                row[f"{label}_error"] = str(e).splitlines()[0][:200]
        out["prefill"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    for label, (m, conv) in variants.items():
        out[f"{label}_converted_layers"] = len(conv["converted"])
        out[f"{label}_skipped_layers"] = len(conv["skipped"])
        try:
            tps = decode_tokens_per_s(m, tok, new_tokens, device)
            out["decode"][f"{label}_tokens_per_s"] = tps
            out["decode"][f"{label}_speedup"] = tps / out["decode"]["dense_tokens_per_s"]
        except Exception as e:
            out["decode"][f"{label}_error"] = str(e).splitlines()[0][:200]
    return out


def bench_training(ref, device, batch: int, seq_len: int, repeats: int) -> dict:
    """Milliseconds per training step, dense against AST (see the module's docstring)."""
    teacher = models.load(ref, device=str(device))  # in the hardware's dtype, as distill loads it
    teacher.model.eval()
    ids = data.blocks("builtin", teacher.tokenizer, "train", batch, seq_len).to(device)
    autocast = torch.autocast(device.type, dtype=models.pick_dtype(device), enabled=device.type == "cuda")
    ast_cfg = sparse_training.AstConfig(model=ref, out="-", seq_len=seq_len, batch=batch)
    cfg = sparse_training.distill_config(ast_cfg)
    hooks = {}

    def make(kind: str):
        student = copy.deepcopy(teacher.model).to(torch.float32).train()
        ast = None
        if kind != "dense":
            ast = sparse_training.AstHooks(dataclasses.replace(ast_cfg, slorb_k=16 if "slorb" in kind else 0))
            ast.prepare(student)
            hooks[kind] = (ast, student)
        module = distill.DistillModule(student, teacher.arch, cfg, teacher.shape)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = ast.make_optimizer(params, cfg) if ast else train.make_optimizer(params, cfg, device)

        def step():
            t_out = distill.teacher_forward(teacher.model, teacher.arch, ids)
            with autocast:
                loss = module(ids, t_out)["loss"]
            loss.backward()
            if ast:
                ast.after_backward(ast.t0, student, optimizer)  # the decay at its full strength
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    steps = {kind: make(kind) for kind in ("dense", "ast", "ast_slorb")}
    for fn in steps.values():  # allocator, kernels, optimizer state
        timed(fn, device, 1, warmup=1)
    rounds = {kind: [] for kind in steps}
    for _ in range(repeats):  # alternating, so that load from elsewhere hits the modes alike
        for kind, fn in steps.items():
            rounds[kind].append(timed(fn, device, 1, warmup=0))
    ast, student = hooks["ast"]
    update_ms = timed(lambda: ast.before_step(ast_cfg.mask_interval, student, None), device, repeats,
                      warmup=1)
    ms = {kind: statistics.median(times) for kind, times in rounds.items()}
    return {
        "model": ref, "batch": batch, "seq_len": seq_len, "rounds": repeats,
        "loss": f"{cfg.kd_weight} KL at T={cfg.temperature} + {cfg.ce_weight} CE",
        "step_ms": ms, "mask_update_ms": update_ms, "mask_interval": ast_cfg.mask_interval,
        "ast_over_dense": ms["ast"] / ms["dense"],
        "ast_slorb_over_dense": ms["ast_slorb"] / ms["dense"],
        "ast_amortized_over_dense": (ms["ast"] + update_ms / ast_cfg.mask_interval) / ms["dense"],
    }


def summarize(result: dict) -> dict:
    s = {"2:4 kernels available": result["sparse_kernels"]["available"]}
    layers = [r for r in result["layers"] if "speedup" in r]
    if layers:
        best = max(layers, key=lambda r: max(r["speedup"], r.get("speedup_search", 0)))
        s["best layer speedup"] = max(best["speedup"], best.get("speedup_search", 0))
        s["best layer"] = f"{best['out']}x{best['in']} @ {best['tokens']} tokens"
        s["worst layer speedup"] = min(max(r["speedup"], r.get("speedup_search", 0)) for r in layers)
    m = result["model"]
    for row in m["prefill"]:
        s[f"prefill b{row['batch']} dense ms"] = row["dense_ms"]
        if "sparse_speedup" in row:
            s[f"prefill b{row['batch']} 2:4 speedup"] = max(row["sparse_speedup"],
                                                             row.get("sparse_search_speedup", 0))
    s["decode dense tok/s"] = m["decode"]["dense_tokens_per_s"]
    if "sparse_speedup" in m["decode"]:
        s["decode 2:4 speedup"] = max(m["decode"]["sparse_speedup"],
                                      m["decode"].get("sparse_search_speedup", 0))
    t = result.get("training")
    if t:
        s["training step dense ms"] = t["step_ms"]["dense"]
        s["AST step over dense"] = t["ast_over_dense"]
        s["AST+SLoRB step over dense"] = t["ast_slorb_over_dense"]
        s["AST with mask updates over dense"] = t["ast_amortized_over_dense"]
    return s


def verdict(result: dict) -> str:
    if not result["sparse_kernels"]["available"]:
        return "not measured: " + result["sparse_kernels"]["reason"]
    faster = [r for r in result["layers"] if max(r.get("speedup", 0), r.get("speedup_search", 0)) > 1.05]
    if not faster:
        return "2:4 was not faster than dense for any layer shape measured here"
    return "2:4 faster than dense (>5%) for: " + ", ".join(
        f"{r['out']}x{r['in']}@{r['tokens']}" for r in faster)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default=None)
    p.add_argument("--model", default="default",
                   help="model for the prefill/decode rows (a folder where the GGUF cannot be read)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparse.json"))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--search-tokens", type=int, default=2048, help="token count for the cuSPARSELt search")
    args = p.parse_args()
    device = models.pick_device(args.device)
    cuda = device.type == "cuda"
    dtype = models.pick_dtype(device)  # by hardware: bfloat16 on sm80+, float16 before, float32 on CPU
    sparse_ok, reason = hardware.sparse_kernels(hardware.props(device))
    repeats = args.repeats or (20 if cuda else 3)
    # a CPU run keeps to the small shapes and short inputs: it measures only the dense side
    shapes = SMALL + (LARGE if cuda else [])
    token_counts = [1, 16, 512, 4096] if cuda else [1, 512]
    batches = [1, 4, 16, 64] if cuda else [1, 4]
    seq_len = 512 if cuda else 128
    new_tokens = 64 if cuda else 16
    started = time.time()
    load_before = os.getloadavg()[0]  # other processes on the machine distort CPU timings
    result = {
        "device": device_name(device), "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "sparse_kernels": {"available": sparse_ok, "reason": reason},
        "layers": bench_layers(device, dtype, shapes, token_counts, repeats, sparse_ok),
        "model": bench_model(args.model, device, dtype, batches, seq_len, new_tokens, repeats, sparse_ok,
                             args.search_tokens),
    }
    result["verdict"] = verdict(result)

    def save():
        result["summary"] = summarize(result)
        result["seconds"] = time.time() - started
        result["load_average"] = {"start": load_before, "end": os.getloadavg()[0], "cpus": os.cpu_count()}
        write_json(args.out, result)

    save()
    batch, train_len = (8, 1024) if cuda else (1, 128)
    try:
        result["training"] = bench_training(args.model, device, batch, train_len, repeats)
    except Exception as e:  # noqa: BLE001  (recorded in the file, and the exit status says so)
        result["training_error"] = f"{type(e).__name__}: {e}"[:1000]
        print(f"bench_sparse: the training part failed: {result['training_error']}", file=sys.stderr)
    save()
    print(json.dumps(result["summary"]))
    return 1 if "training_error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
