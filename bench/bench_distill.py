"""Cost of a distillation step against a plain cross-entropy step, and the fast paths on CUDA.

    .venv/bin/python -m bench.bench_distill [--model REF] [--device cpu|cuda] [--batch B] [--seq-len L]
                                            [--student depth|width] [--keep-layers N] [--steps N]
                                            [--fast|--no-fast] [--out FILE]

Teacher: the default model (SmolLM2-135M). Student (--student): `depth`, the same model with only
its first --keep-layers layers (18 of 30: about 92M parameters, the issue's "~90M"), built by
depth pruning (compact.prune, no scores needed); or `width`, every layer kept and hidden, FFN
and heads narrowed (the search's closest shape to the depth student's size, within 3%, pruned
with activation scores from 4 calibration blocks): the Minitron student, more layers and so
more, smaller kernels per token. Each mode is one full training step on the same
batch: forward, backward, AdamW step; fp32 master weights, autocast on CUDA in the
hardware's dtype (compact.hardware: bf16 on sm80+, fp16 before).
  plain:      the student's own forward with labels (transformers' loss on full logits)
  ce_chunked: compact's student module, cross-entropy only, logits in chunks
  distill:    teacher forward (no grad) + student, KL(teacher||student) with chunked logits
and with --fast (the default on CUDA) the same distillation step made faster:
  distill_liger:                liger-kernel's fused linear JSD (beta 0: the same KL), --loss-kernel liger
  distill_compile_layers:       torch.compile of each student and teacher layer, --compile layers
  distill_liger_compile_layers: both
  distill_compile_model:        torch.compile of the whole student and teacher bodies, --compile model
(liger modes only where liger-kernel and triton are installed). The issue's goals: distill at
most 1.3x the time of plain; the fastest distillation mode at least 200,000 tokens/s for this
teacher and student at sequence length 1024 on one H100. The modes run in groups: eager, then
compiled layers, then compiled bodies (the longest to compile); within a group modes alternate
step by step so that load from other processes hits them alike (the ratios are medians of
per-round ratios), and the file is written after each group, so a run stopped while compiling
keeps what was measured ("not_measured" names the rest). warm_up_s: the first steps of a mode,
compilation included.
Peak memory: on CUDA max_memory_allocated per mode, in this process; on CPU each mode runs in
its own process and reports its peak resident set (ru_maxrss) less the resident set before the
first step. Defaults: CUDA batch 24 x 1024 tokens (the issue's set-up); CPU batch 2 x 256.
Model FLOPs utilisation (`mfu`, where the GPU's peak is in bench.common.PEAK_TFLOPS): the
teacher's forward plus the student's forward and backward (3x), 2 FLOPs per multiply-add of
every weight matrix, the tied LM head included, and of attention at the full sequence length
(compact.shapes.flops_per_token, PaLM's convention), over the GPU's dense bf16/fp16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import device_name, peak_tflops, sync, write_json
from compact import data, distill, importance, liger, models, prune, search, shapes

MODES = ("plain", "ce_chunked", "distill")
FAST = ("distill_liger", "distill_compile_layers", "distill_liger_compile_layers", "distill_compile_model")
GOAL_TOKENS_PER_S = 200_000  # the goal for the fastest distillation mode on one H100
ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def setup(args):
    device = models.pick_device(args.device)
    teacher = models.load(args.model, device=str(device))  # in the hardware's dtype (compact.hardware)
    student_model = make_student(args, teacher)
    student_model.to(device=device, dtype=torch.float32).train()
    cfg = distill.DistillConfig(teacher=args.model, student=f"{args.model} ({args.student} student)", out="-",
                                seq_len=args.seq_len, batch=args.batch, chunk=args.chunk)
    module = distill.DistillModule(student_model, teacher.arch, cfg, teacher.shape)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = data.blocks("builtin", teacher.tokenizer, "train", args.batch, args.seq_len).to(device)
    # the training loop's precision on this hardware (bf16 on sm80+, fp16 before; CPU: fp32)
    autocast = torch.autocast(device.type, dtype=models.pick_dtype(device), enabled=device.type == "cuda")
    teacher.model.eval()

    def plain():
        with autocast:
            loss = student_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()

    def ce_chunked():
        with autocast:
            loss = module(ids, None, kd_weight=0.0, ce_weight=1.0)["loss"]
        loss.backward()

    def distill_with(kernel: str, compile_: str):
        """A distillation step as compact.distill.run takes it with --loss-kernel and --compile
        (for "layers", while layers_on() holds). Every mode trains the same student weights
        (only the timing matters here)."""
        mod = distill.DistillModule(student_model, teacher.arch,
                                    dataclasses.replace(cfg, loss_kernel=kernel), teacher.shape)
        t_body = None
        if compile_ == "model":
            mod.compile_body()
            t_body = distill.compiled_body(teacher.model, teacher.arch)

        def fn():
            t_out = distill.teacher_forward(teacher.model, teacher.arch, ids, body=t_body)
            with autocast:
                loss = mod(ids, t_out, kd_weight=1.0, ce_weight=0.0)["loss"]
            loss.backward()
        return fn

    def step(fn):
        def run():
            fn()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    def layers_on():
        """Compile the student's and the teacher's layers in place; returns what undoes it."""
        undo = [distill.compile_blocks(m, teacher.arch) for m in (student_model, teacher.model)]
        return lambda: [u() for u in undo]

    fns = {"plain": plain, "ce_chunked": ce_chunked, "distill": distill_with("compact", "off")}
    if args.fast:
        use_liger = liger.problem(device) is None
        for mode in FAST:
            if use_liger or "liger" not in mode:
                fns[mode] = distill_with("liger" if "liger" in mode else "compact", compile_mode(mode))
    steps = {m: step(fn) for m, fn in fns.items()}
    student_shape = teacher.arch.shape(student_model.config)
    return device, teacher, steps, student_shape, layers_on


def make_student(args, teacher):
    """The --student model from the teacher (sets args.keep_layers and args.student_shape)."""
    layers = teacher.shape.layers
    args.keep_layers = args.keep_layers or max(1, round(layers * 0.6))  # 18 of SmolLM2's 30
    depth = teacher.shape.with_targets(layers=args.keep_layers)
    if args.student == "depth":
        args.student_shape = {"layers": args.keep_layers}
        return prune.trim(teacher.model, None, drop_layers=list(range(args.keep_layers, layers)))
    width = search.candidates(teacher.shape, depth.params, 0.03, layers=[layers], min_fraction=0.4)
    if not width:
        raise SystemExit(f"bench_distill: no width-only shape within 3% of {depth.params:,} parameters")
    s = width[0]
    args.student_shape = {"layers": s.layers, "hidden": s.hidden, "ffn": s.ffn, "heads": s.heads}
    blocks = data.blocks("builtin", teacher.tokenizer, "calibration", 4, 128).to(teacher.model.device)
    scores = importance.estimate(teacher.model, blocks, batch_size=4)  # speed only: few blocks do
    return prune.trim(teacher.model, scores, **args.student_shape)


def train_flops_per_token(teacher_shape, student_shape, seq_len: int) -> int:
    """Teacher forward + student forward and backward (twice the forward) per training token."""
    return (shapes.flops_per_token(teacher_shape, seq_len)
            + 3 * shapes.flops_per_token(student_shape, seq_len))


def compile_mode(mode: str) -> str:
    """The --compile value a mode measures."""
    return mode.rsplit("compile_", 1)[1] if "compile_" in mode else "off"


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def cuda_peak(fn, device) -> int:
    """Peak CUDA memory of two steps beyond what was allocated before them."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def memory_child(args) -> None:
    """One mode in this process (CPU: peak resident memory cannot be reset): print it as JSON."""
    device, _, steps, _, layers_on = setup(args)
    if compile_mode(args.mode) == "layers":
        layers_on()
    base = rss_bytes()
    steps[args.mode]()
    steps[args.mode]()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak - base}))


def summarize(args, device, teacher, student_shape, tokens, modes, times, warm_up, peaks, errors) -> dict:
    """The result file from the modes measured so far (those not yet measured are named, and
    the error of those that failed)."""
    done = [m for m in modes if times.get(m)]
    speed = {m: tokens / statistics.median(times[m]) for m in done}
    best = max((m for m in done if m.startswith("distill")), key=speed.get)
    ratios = [d / p for d, p in zip(times["distill"], times["plain"], strict=True)]
    ratios_ce = [c / p for c, p in zip(times["ce_chunked"], times["plain"], strict=True)]

    def mb(m):
        return peaks[m] / 2**20 if m in peaks else None

    flops = train_flops_per_token(teacher.shape, student_shape, args.seq_len)
    peak = peak_tflops(device)

    def utilisation(m):
        achieved = speed[m] * flops / 1e12
        return {"model_tflops_per_s": achieved, "mfu": achieved / peak if peak else None}

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "teacher": "SmolLM2-135M-Instruct (default)" if args.model == "default" else args.model,
        "teacher_params": sum(p.numel() for p in teacher.model.parameters()),
        "student": args.student,
        "student_shape": args.student_shape,
        "student_params": student_shape.params,
        "train_flops_per_token": flops,
        "peak_tflops": peak,
        "batch": args.batch, "seq_len": args.seq_len, "chunk": args.chunk, "rounds": args.steps,
        "precision": (f"{str(models.pick_dtype(device)).removeprefix('torch.')} autocast, fp32 master "
                      "weights") if device.type == "cuda" else "fp32",
        "liger": liger.problem(device) or "installed",
        "modes": {m: {"step_s_median": statistics.median(times[m]), "tokens_per_s": speed[m],
                      "warm_up_s": warm_up[m], "peak_memory_mb": mb(m), **utilisation(m)}
                  for m in done},
        "not_measured": [m for m in modes if m not in done],
        "errors": errors,
        "summary": {
            "distill_tokens_per_s": speed["distill"],
            "fastest_distill_mode": best,
            "fastest_distill_tokens_per_s": speed[best],
            "fastest_distill_mfu": utilisation(best)["mfu"],
            "goal_tokens_per_s": GOAL_TOKENS_PER_S,
            "goal_met": speed[best] >= GOAL_TOKENS_PER_S,
            "plain_ce_tokens_per_s": speed["plain"],
            "distill_over_plain_time": statistics.median(ratios),
            "chunked_ce_over_plain_time": statistics.median(ratios_ce),
            "distill_peak_mb": mb("distill"),
            "plain_peak_mb": mb("plain"),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--model", default="default", help="the teacher (REF; a local folder where "
                        "the default GGUF cannot be read)")
    parser.add_argument("--student", choices=("depth", "width"), default="depth",
                        help="depth: the first --keep-layers layers; width: every layer, narrower, "
                             "of about the same size")
    parser.add_argument("--keep-layers", type=int, default=None,
                        help="the depth student's layers, and so both students' size (default 60%%)")
    parser.add_argument("--chunk", type=int, default=distill.DistillConfig.chunk)
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (each mode once)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill.json"))
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                        help="also the liger and compiled modes (default: on CUDA)")
    parser.add_argument("--mode", choices=MODES + FAST, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = models.pick_device(args.device).type == "cuda"
    args.batch = args.batch or (24 if cuda else 2)
    args.seq_len = args.seq_len or (1024 if cuda else 256)
    args.steps = args.steps or (20 if cuda else 4)
    args.fast = cuda if args.fast is None else args.fast
    if args.mode:
        memory_child(args)
        return 0

    device, teacher, steps, student_shape, layers_on = setup(args)
    tokens = args.batch * args.seq_len
    modes = list(steps)
    times, warm_up, peaks, errors = {}, {}, {}, {}
    # Eager, then compiled layers, then compiled bodies (the longest to compile), and the file
    # written after each group: a run stopped by a time limit keeps what it measured, and a
    # group that fails (a compiler error, say) is recorded and the next one still runs.
    for kind in ("off", "layers", "model"):
        group = [m for m in modes if compile_mode(m) == kind]
        if not group:
            continue
        plain_again = layers_on() if kind == "layers" else None
        try:
            for m in group:  # allocator, kernels, optimizer state; compiled modes compile (and may recompile)
                warm_up[m] = sum(timed(steps[m], device) for _ in range(1 if kind == "off" else 3))
            rounds = {m: [] for m in group}
            for _ in range(args.steps):
                for m in group:  # alternating, so that load from elsewhere hits the modes alike
                    rounds[m].append(timed(steps[m], device))
            if device.type == "cuda":
                peaks.update({m: cuda_peak(steps[m], device) for m in group})
            times.update(rounds)
        except Exception as e:  # noqa: BLE001  (recorded in the file, and the exit status says so)
            if kind == "off":
                raise
            errors.update({m: f"{type(e).__name__}: {e}"[:1000] for m in group})
            print(f"bench_distill: {', '.join(group)} failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            if plain_again:
                plain_again()
        write_json(args.out, summarize(args, device, teacher, student_shape, tokens, modes, times, warm_up,
                                       peaks, errors))
    del steps
    for m in [m for m in modes if m in times] if device.type != "cuda" else ():  # CPU: separate processes
        cmd = [sys.executable, "-m", "bench.bench_distill", "--mode", m, "--model", args.model,
               "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--keep-layers", str(args.keep_layers),
               "--student", args.student,
               "--chunk", str(args.chunk), "--fast" if args.fast else "--no-fast"]
        if args.device:
            cmd += ["--device", args.device]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        peaks[m] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    result = summarize(args, device, teacher, student_shape, tokens, modes, times, warm_up, peaks, errors)
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
