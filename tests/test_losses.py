"""Distillation losses (compact/losses.py): chunked KD and CE against full-logit references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compact import distill, losses


def _reference_kd(zs, zt, temperature):
    log_q = F.log_softmax(zs / temperature, -1)
    log_p = F.log_softmax(zt / temperature, -1)
    kl = F.kl_div(log_q.reshape(-1, zs.size(-1)), log_p.reshape(-1, zs.size(-1)), log_target=True,
                  reduction="sum")
    return kl * temperature ** 2 / zs[..., 0].numel()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_kd_loss_chunks_equal_full_logits(chunk):
    gen = torch.Generator().manual_seed(0)
    zt = torch.randn(2, 7, 50, generator=gen, dtype=torch.float64) * 3
    zs = torch.randn(2, 7, 50, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = _reference_kd(zs, zt, 2.0)
    (g_ref,) = torch.autograd.grad(ref, zs)
    got = losses.kd_loss(zs, zt, temperature=2.0, chunk=chunk)
    (g_got,) = torch.autograd.grad(got * 1.0, zs)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(g_got, g_ref, rtol=1e-5, atol=1e-9)


def test_kd_loss_of_identical_logits_is_zero():
    z = torch.randn(3, 5, 40)
    assert losses.kd_loss(z.clone().requires_grad_(), z, 1.5).item() == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_head_losses_chunked_equal_full_logits(chunk):
    """KD + CE from hidden states, chunk by chunk, equals the full-logit computation: values and
    the gradients for the student's states, head weight and bias."""
    gen = torch.Generator().manual_seed(1)
    n, hs, ht, v, temp, kw, cw = 11, 6, 9, 37, 2.0, 0.7, 0.4
    h = torch.randn(n, hs, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, hs, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True)
    th = torch.randn(n, ht, generator=gen, dtype=torch.float64)
    tw = torch.randn(v, ht, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[2] = losses.IGNORE_INDEX

    zs = h @ w.T + b
    ref_kd = _reference_kd(zs, th @ tw.T, temp)
    ref_ce = F.cross_entropy(zs, labels, ignore_index=losses.IGNORE_INDEX)
    ref = kw * ref_kd + cw * ref_ce
    ref_grads = torch.autograd.grad(ref, (h, w, b))

    total, kd, ce = losses.head_losses(h, w, b, labels, th, tw, None, temp, kw, cw, chunk)
    grads = torch.autograd.grad(total, (h, w, b))
    assert torch.allclose(kd.double(), ref_kd, rtol=1e-5) and torch.allclose(ce.double(), ref_ce, rtol=1e-5)
    assert torch.allclose(total.double(), ref, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    assert not kd.requires_grad and not ce.requires_grad


def test_head_losses_without_teacher_is_cross_entropy_and_no_grad_in_eval():
    h, w = torch.randn(5, 4), torch.randn(20, 4)
    labels = torch.randint(0, 20, (5,))
    with torch.no_grad():
        total, kd, ce = losses.head_losses(h, w, None, labels, kd_weight=1.0, ce_weight=0.0)
    assert kd.item() == 0.0 and torch.allclose(ce, F.cross_entropy(h @ w.T, labels))


def test_state_pairs_end_on_the_final_norm():
    assert losses.state_pairs(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert losses.state_pairs(2, 6) == [(1, 3), (2, 6)]
    # depth-pruned student: block inputs pair with the teacher blocks they came from
    assert distill.state_pairs(3, 6, kept_layers=[0, 2, 5]) == [(1, 2), (2, 5), (3, 6)]


def test_head_losses_follow_gemma2_final_logit_soft_capping():
    """Student and teacher logits capped as cap * tanh(z / cap) (Gemma 2): values and gradients
    equal autograd through the full capped logits."""
    gen = torch.Generator().manual_seed(2)
    n, hid, v, cap = 9, 5, 31, 3.0
    h = (torch.randn(n, hid, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(v, hid, generator=gen, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(n, hid, generator=gen, dtype=torch.float64) * 3, torch.randn(v, hid, generator=gen,
                                                                                       dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=gen)

    def capped(z, c):
        return torch.tanh(z / c) * c

    zs = capped(h @ w.T, cap)
    ref = 0.6 * _reference_kd(zs, capped(th @ tw.T, 5.0), 2.0) + 0.4 * F.cross_entropy(zs, labels)
    ref_grads = torch.autograd.grad(ref, (h, w))
    total, _, _ = losses.head_losses(h, w, None, labels, th, tw, None, 2.0, 0.6, 0.4, 4, softcap=cap,
                                     teacher_softcap=5.0)
    grads = torch.autograd.grad(total, (h, w))
    assert torch.allclose(total.double(), ref, rtol=1e-5)  # softmax and sums run in fp32
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    uncapped, _, _ = losses.head_losses(h, w, None, labels, th, tw, None, 2.0, 0.6, 0.4, 4)
    assert abs(float(uncapped) - float(total)) > 1e-2  # the cap acts at these logit sizes


def test_liger_kernel_refuses_what_it_cannot_compute():
    """--loss-kernel liger: a CPU, an LM head with a bias and soft-capped logits are refused in
    one sentence each (its agreement with compact's loss is tested on CUDA, test_cuda.py)."""
    from compact import liger
    from compact.errors import UserError

    assert "needs a CUDA GPU" in liger.problem("cpu")
    liger.check_head(torch.nn.Linear(4, 8, bias=False), None, "student")  # nothing to refuse
    with pytest.raises(UserError, match="no LM-head bias and the teacher's head has one"):
        liger.check_head(torch.nn.Linear(4, 8), None, "teacher")
    with pytest.raises(UserError, match="does not soft-cap logits as the student does"):
        liger.check_head(torch.nn.Linear(4, 8, bias=False), 30.0, "student")
