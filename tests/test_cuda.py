"""Every job at tiny size on a CUDA GPU: load, importance, prune, each one-shot sparsity method,
AST, distillation (in the hardware's precision and in fp16 with loss scaling), generate, eval,
the Compare tab's speed and, where the GPU has them, the 2:4 kernels.

Each test runs twice, on `cuda` (marked `cuda`: skipped without CUDA, tests/conftest.py) and on
the CPU, where whatever is CUDA's alone (precision by compute capability, liger, the 2:4
kernels) is checked against what the CPU does instead, or skipped. The CPU run keeps this file
working between the rare sessions that have a GPU. Needs neither the default model nor gguf,
gradio or datasets: the tokenizer is trained here and the model is a tiny random Llama, so it
runs on a bare GPU machine (bench/gpu.sh runs the cuda half).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from compact import evaluate, hardware, importance, liger, losses, models, prune, sparsify, sparsity
from compact.distill import DistillConfig
from compact.distill import run as distill_run
from tests.helpers import reference_text, tiny_model, tiny_tokenizer

SEQ = 32


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda), "cpu"])
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama checkpoint (64 wide, 4 layers) and a text file to calibrate and train on."""
    root = tmp_path_factory.mktemp("cuda")
    tok = tiny_tokenizer()
    text = root / "text.txt"
    text.write_text(reference_text())
    ckpt = root / "tiny"
    models.save(tiny_model("llama", len(tok)), tok, ckpt, {"source": "test_cuda"})
    return {"root": root, "ckpt": str(ckpt), "text": str(text)}


def _finite(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def test_load_picks_the_hardwares_precision(files, device):
    loaded = models.load(files["ckpt"], device=device)
    dev = hardware.props(device)
    assert dev.is_cuda == (device == "cuda") and next(loaded.model.parameters()).device.type == device
    assert next(loaded.model.parameters()).dtype == hardware.compute_dtype(dev)
    if dev.is_cuda:
        expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    else:
        expected = torch.float32
    assert hardware.compute_dtype(dev) == expected


def test_importance_and_prune(files, device, tmp_path):
    scores = tmp_path / "scores.safetensors"
    res = importance.run(importance.ImportanceConfig(
        model=files["ckpt"], data=files["text"], samples=4, seq_len=SEQ, batch=2, depth_ppl=True,
        out=str(scores), device=device))
    assert scores.exists() and res["depth_ppl"]
    out = tmp_path / "pruned"
    res = prune.run(prune.PruneConfig(
        model=files["ckpt"], out=str(out), layers=3, heads=2, ffn=64, importance=str(scores),
        data=files["text"], seq_len=SEQ, eval_tokens=4 * SEQ, device=device))
    assert (out / "model.safetensors").exists()
    again = models.load(str(out), device=device)
    assert (again.shape.layers, again.shape.heads, again.shape.ffn) == (3, 2, 64)


@pytest.mark.parametrize("method", sorted(sparsity.ONE_SHOT))
def test_one_shot_sparsity(files, device, tmp_path, method):
    out = tmp_path / f"sparse-{method}"
    res = sparsify.run(sparsify.SparsifyConfig(
        model=files["ckpt"], out=str(out), method=method, data=files["text"], samples=4, seq_len=SEQ,
        batch=2, eval_tokens=4 * SEQ, device=device))
    assert res["pattern_ok"] and _finite(res["ppl_before"], res["ppl_after"])


def test_ast(files, device, tmp_path):
    out = tmp_path / "ast"
    res = sparsify.run(sparsify.SparsifyConfig(
        model=files["ckpt"], out=str(out), method="ast", data=files["text"], tokens=4 * 2 * SEQ,
        seq_len=SEQ, batch=2, mask_interval=2, slorb_k=16, eval_tokens=4 * SEQ, checkpoint_every=0,
        device=device))
    assert res["pattern_ok"] and res["training"]["steps"] == 4 and _finite(res["ppl_after"])


@pytest.mark.parametrize("dtype", [None, "float16"])  # the hardware's precision; fp16 + loss scaling
def test_distill(files, device, tmp_path, dtype):
    out = tmp_path / f"distill-{dtype or 'auto'}"
    res = distill_run(DistillConfig(
        teacher=files["ckpt"], student=files["ckpt"], data=files["text"], out=str(out),
        tokens=4 * 2 * SEQ, seq_len=SEQ, batch=2, ce_weight=0.5, hidden_weight=1.0, eval_tokens=4 * SEQ,
        checkpoint_every=2, device=device, dtype=dtype))
    assert res["status"] == "done" and res["steps"] == 4
    assert res["device"].startswith(device)
    assert _finite(res["loss"], res["val_loss_before"], res["val_loss_after"])
    assert (out / "model.safetensors").exists() and not (out / "checkpoint").exists()


def _head_losses(device, kernel, h, w, th, tw, labels):
    """One training step's logit losses under the hardware's autocast: values and gradients."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast(device, dtype=hardware.compute_dtype(hardware.props(device))):
        total, kd, ce = losses.head_losses(h, w, None, labels, th, tw, None, temperature=2.0,
                                           kd_weight=1.0, ce_weight=0.5, chunk=96, kernel=kernel)
    total.backward()
    return total.detach(), kd, ce, h.grad, w.grad


def test_liger_kernel_agrees_with_compacts_loss(device):
    """--loss-kernel liger computes compact's KD (forward KL at T, times T^2, mean over positions)
    and CE: the same values and gradients, up to the low-precision head matmuls."""
    if liger.problem(device):
        pytest.skip(liger.problem(device))
    g = torch.Generator(device).manual_seed(0)
    n, hidden, t_hidden, vocab = 300, 64, 96, 1000
    h = torch.randn(n, hidden, device=device, generator=g)
    w = torch.randn(vocab, hidden, device=device, generator=g) * 0.2
    th = torch.randn(n, t_hidden, device=device, generator=g).bfloat16()
    tw = (torch.randn(vocab, t_hidden, device=device, generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    labels[:7] = losses.IGNORE_INDEX  # CE averages over labelled positions only, KD over all
    ours, theirs = (_head_losses(device, kernel, h, w, th, tw, labels) for kernel in ("compact", "liger"))
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-3), (a, b)
    for a, b in zip(ours[3:], theirs[3:], strict=True):
        assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 5e-2


@pytest.mark.parametrize("compile_", ["layers", "model"])
def test_distill_with_liger_and_compile(files, device, tmp_path, compile_):
    """The fast paths on a GPU: liger's fused losses (where installed) and compiled layers or bodies."""
    if device == "cpu":
        pytest.skip("--compile on the CPU: tests/test_distill.py::test_compiled_runs_equal_the_eager_one")
    kernel = "compact" if liger.problem(device) else "liger"
    out = tmp_path / f"distill-fast-{kernel}-{compile_}"
    res = distill_run(DistillConfig(
        teacher=files["ckpt"], student=files["ckpt"], data=files["text"], out=str(out),
        tokens=4 * 2 * SEQ, seq_len=SEQ, batch=2, ce_weight=0.5, eval_tokens=4 * SEQ,
        checkpoint_every=0, device=device, loss_kernel=kernel, compile=compile_))
    assert res["status"] == "done" and _finite(res["loss"], res["val_loss_after"])
    assert models.load(str(out), device=device).shape.layers == 4


def test_generate_eval_and_speed(files, device):
    gen = evaluate.generate_job(evaluate.GenerateConfig(model=files["ckpt"], prompt="The value of",
                                                        max_new_tokens=4, device=device))
    assert isinstance(gen["text"], str)
    ev = evaluate.eval_job(evaluate.EvalConfig(model=files["ckpt"], data=files["text"], tokens=4 * SEQ,
                                               seq_len=SEQ, batch=2, device=device))
    assert _finite(ev["loss"])
    loaded = models.load(files["ckpt"], device=device)
    speed = evaluate.speed(loaded.model, prompt_tokens=16, decode_tokens=4, budget_s=0)
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0


def test_semi_structured_kernels_or_the_reason(files, device):
    ok, why = hardware.sparse_kernels(hardware.props(device))
    loaded = models.load(files["ckpt"], device=device)
    sparsity.one_shot(loaded.model, "magnitude")
    if not ok:
        with pytest.raises(models.UserError, match=re.escape(why)):  # the CPU, or a GPU before sm80
            sparsity.to_semi_structured(loaded.model)
        return
    ids = torch.randint(0, loaded.shape.vocab, (2, 64), device=device)
    with torch.no_grad():
        dense = loaded.model(ids).logits.float()
        report = sparsity.to_semi_structured(loaded.model)
        converted = loaded.model(ids).logits.float()
    assert report["converted"]
    assert torch.allclose(dense, converted, atol=0.1, rtol=0.05)
