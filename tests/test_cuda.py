"""Every job at tiny size on a CUDA GPU: load, importance, prune, each one-shot sparsity method,
AST, distillation (in the hardware's precision and in fp16 with loss scaling), generate, eval,
the Compare tab's speed and, where the GPU has them, the 2:4 kernels.

Skipped without CUDA (tests/conftest.py). Needs neither the default model nor gguf, gradio or
datasets: the tokenizer is trained here and the model is a tiny random Llama, so it runs on a
bare GPU machine (bench/gpu.sh runs it).
"""

from __future__ import annotations

import math

import pytest
import torch

from compact import evaluate, hardware, importance, liger, losses, models, prune, sparsify, sparsity
from compact.distill import DistillConfig
from compact.distill import run as distill_run
from tests.helpers import reference_text, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.cuda

CUDA = "cuda"
SEQ = 32


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


def test_load_picks_the_hardwares_precision(files):
    loaded = models.load(files["ckpt"], device=CUDA)
    dev = hardware.props(CUDA)
    assert dev.is_cuda and next(loaded.model.parameters()).device.type == "cuda"
    assert next(loaded.model.parameters()).dtype == hardware.compute_dtype(dev)
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert hardware.compute_dtype(dev) == expected


def test_importance_and_prune(files):
    scores = files["root"] / "scores.safetensors"
    res = importance.run(importance.ImportanceConfig(
        model=files["ckpt"], data=files["text"], samples=4, seq_len=SEQ, batch=2, depth_ppl=True,
        out=str(scores), device=CUDA))
    assert scores.exists() and res["depth_ppl"]
    out = files["root"] / "pruned"
    res = prune.run(prune.PruneConfig(
        model=files["ckpt"], out=str(out), layers=3, heads=2, ffn=64, importance=str(scores),
        data=files["text"], seq_len=SEQ, eval_tokens=4 * SEQ, device=CUDA))
    assert (out / "model.safetensors").exists()
    again = models.load(str(out), device=CUDA)
    assert (again.shape.layers, again.shape.heads, again.shape.ffn) == (3, 2, 64)


@pytest.mark.parametrize("method", sorted(sparsity.ONE_SHOT))
def test_one_shot_sparsity(files, method):
    out = files["root"] / f"sparse-{method}"
    res = sparsify.run(sparsify.SparsifyConfig(
        model=files["ckpt"], out=str(out), method=method, data=files["text"], samples=4, seq_len=SEQ,
        batch=2, eval_tokens=4 * SEQ, device=CUDA))
    assert res["pattern_ok"] and _finite(res["ppl_before"], res["ppl_after"])


def test_ast(files):
    out = files["root"] / "ast"
    res = sparsify.run(sparsify.SparsifyConfig(
        model=files["ckpt"], out=str(out), method="ast", data=files["text"], tokens=4 * 2 * SEQ,
        seq_len=SEQ, batch=2, mask_interval=2, slorb_k=16, eval_tokens=4 * SEQ, checkpoint_every=0,
        device=CUDA))
    assert res["pattern_ok"] and res["training"]["steps"] == 4 and _finite(res["ppl_after"])


@pytest.mark.parametrize("dtype", [None, "float16"])  # the hardware's precision; fp16 + loss scaling
def test_distill(files, dtype):
    out = files["root"] / f"distill-{dtype or 'auto'}"
    res = distill_run(DistillConfig(
        teacher=files["ckpt"], student=files["ckpt"], data=files["text"], out=str(out),
        tokens=4 * 2 * SEQ, seq_len=SEQ, batch=2, ce_weight=0.5, hidden_weight=1.0, eval_tokens=4 * SEQ,
        checkpoint_every=2, device=CUDA, dtype=dtype))
    assert res["status"] == "done" and res["steps"] == 4
    assert res["device"].startswith("cuda")
    assert _finite(res["loss"], res["val_loss_before"], res["val_loss_after"])
    assert (out / "model.safetensors").exists() and not (out / "checkpoint").exists()


def _head_losses(kernel, h, w, th, tw, labels):
    """One training step's logit losses under the hardware's autocast: values and gradients."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=hardware.compute_dtype(hardware.props(CUDA))):
        total, kd, ce = losses.head_losses(h, w, None, labels, th, tw, None, temperature=2.0,
                                           kd_weight=1.0, ce_weight=0.5, chunk=96, kernel=kernel)
    total.backward()
    return total.detach(), kd, ce, h.grad, w.grad


def test_liger_kernel_agrees_with_compacts_loss():
    """--loss-kernel liger computes compact's KD (forward KL at T, times T^2, mean over positions)
    and CE: the same values and gradients, up to the low-precision head matmuls."""
    if liger.problem(CUDA):
        pytest.skip(liger.problem(CUDA))
    g = torch.Generator(CUDA).manual_seed(0)
    n, hidden, t_hidden, vocab = 300, 64, 96, 1000
    h = torch.randn(n, hidden, device=CUDA, generator=g)
    w = torch.randn(vocab, hidden, device=CUDA, generator=g) * 0.2
    th = torch.randn(n, t_hidden, device=CUDA, generator=g).bfloat16()
    tw = (torch.randn(vocab, t_hidden, device=CUDA, generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, vocab, (n,), device=CUDA, generator=g)
    labels[:7] = losses.IGNORE_INDEX  # CE averages over labelled positions only, KD over all
    ours, theirs = _head_losses("compact", h, w, th, tw, labels), _head_losses("liger", h, w, th, tw, labels)
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-3), (a, b)
    for a, b in zip(ours[3:], theirs[3:], strict=True):
        assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 5e-2


def test_distill_with_liger_and_compile(files):
    """The fast path on a GPU: liger's fused losses (where installed) and compiled bodies."""
    kernel = "compact" if liger.problem(CUDA) else "liger"
    out = files["root"] / f"distill-fast-{kernel}"
    res = distill_run(DistillConfig(
        teacher=files["ckpt"], student=files["ckpt"], data=files["text"], out=str(out),
        tokens=4 * 2 * SEQ, seq_len=SEQ, batch=2, ce_weight=0.5, eval_tokens=4 * SEQ,
        checkpoint_every=0, device=CUDA, loss_kernel=kernel, compile=True))
    assert res["status"] == "done" and _finite(res["loss"], res["val_loss_after"])
    assert models.load(str(out), device=CUDA).shape.layers == 4


def test_generate_eval_and_speed(files):
    gen = evaluate.generate_job(evaluate.GenerateConfig(model=files["ckpt"], prompt="The value of",
                                                        max_new_tokens=4, device=CUDA))
    assert isinstance(gen["text"], str)
    ev = evaluate.eval_job(evaluate.EvalConfig(model=files["ckpt"], data=files["text"], tokens=4 * SEQ,
                                               seq_len=SEQ, batch=2, device=CUDA))
    assert _finite(ev["loss"])
    loaded = models.load(files["ckpt"], device=CUDA)
    speed = evaluate.speed(loaded.model, prompt_tokens=16, decode_tokens=4, budget_s=0)
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0


def test_semi_structured_kernels_or_the_reason(files):
    ok, why = hardware.sparse_kernels(hardware.props(CUDA))
    loaded = models.load(files["ckpt"], device=CUDA)
    sparsity.one_shot(loaded.model, "magnitude")
    if not ok:
        with pytest.raises(models.UserError, match="compute capability"):
            sparsity.to_semi_structured(loaded.model)
        return
    ids = torch.randint(0, loaded.shape.vocab, (2, 64), device=CUDA)
    with torch.no_grad():
        dense = loaded.model(ids).logits.float()
        report = sparsity.to_semi_structured(loaded.model)
        converted = loaded.model(ids).logits.float()
    assert report["converted"]
    assert torch.allclose(dense, converted, atol=0.1, rtol=0.05)
