import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compact import distill, models, sparse_training, sparsity
from compact.arch import weight_oi
from compact.errors import Cancelled, UserError
from tests.helpers import run_cli


def test_decay_schedule_hand_values():
    assert [sparse_training.decay_lambda(t, 0.5, 3) for t in range(6)] == [0.0, 0.5, 1.0, 1.5, 1.5, 1.5]
    assert sparse_training.decay_lambda(10, 2e-8, 3000) == pytest.approx(2e-7)
    assert sparse_training.decay_lambda(5000, 2e-8, 3000) == pytest.approx(6e-5)
    # defaults: the paper's GPT-2 ramp to 1e-4 over the first quarter of the steps
    cfg = sparse_training.AstConfig(tokens=40 * 8 * 256)  # 40 steps of 8 x 256
    assert cfg.decay() == (pytest.approx(1e-4 / 10), 10)


def test_straight_through_gradient():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.25, -0.75, 2.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    c = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    out = sparse_training.MaskedWeight.apply(w, mask)
    assert out.tolist() == [[0.0, 0.0, 3.0, -4.0], [0.5, 0.0, 0.0, 2.0]]
    (out * c).sum().backward()
    assert torch.equal(w.grad, c)  # pruned entries get the masked weight's gradient unchanged
    # through a linear layer: dL/dW = g^T x for every entry, masked or not
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    w.grad = None
    (x @ sparse_training.MaskedWeight.apply(w, mask).T).sum().backward()
    assert torch.equal(w.grad, x.expand(2, 4))


def _prepared(make_model, family="llama", **cfg):
    model = make_model(family)
    hooks = sparse_training.AstHooks(sparse_training.AstConfig(**cfg))
    hooks.prepare(model)
    return model, hooks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masked_forward_equals_pruned_model(family, make_model, tokenizer):
    model, hooks = _prepared(make_model, family)
    pruned = copy.deepcopy(make_model(family))
    sparsity.one_shot(pruned, "magnitude")
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, pruned(ids).logits, atol=1e-5)
    for name, mod in hooks.linears.items():  # the dense weights are untouched
        assert (weight_oi(mod) != 0).all(), name


def test_ast_adamw_hand_values():
    # one 1x4 weight, keep-mask [1, 1, 0, 0]; two steps with lambda 0.5 then 1.0
    w0 = [1.0, -2.0, 3.0, -4.0]
    keep = torch.tensor([[True, True, False, False]])
    grads = [[0.1, -0.2, 0.3, 0.4], [-0.3, 0.1, 0.2, -0.1]]
    lr, (b1, b2), eps = 0.1, (0.9, 0.95), 1e-8
    w = torch.nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    opt = sparse_training.AstAdamW([{"params": [w]}], {w: keep}, lr=lr, betas=(b1, b2), eps=eps)
    expect, m, v = list(w0), [0.0] * 4, [0.0] * 4
    for t, (lam, g) in enumerate(zip((0.5, 1.0), grads, strict=True), start=1):
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.param_groups[0]["ast_decay"] = lam
        opt.step()
        for j in range(4):  # the paper's rule, written out per entry
            m[j] = b1 * m[j] + (1 - b1) * g[j]
            u = m[j] / (1 - b1 ** t) + lam * (0.0 if keep[0, j] else expect[j])
            v[j] = b2 * v[j] + (1 - b2) * u * u
            expect[j] -= lr * u / ((v[j] / (1 - b2 ** t)) ** 0.5 + eps)
        assert w.detach()[0].tolist() == pytest.approx(expect, rel=1e-12), t


def test_ast_adamw_is_adamw_for_unmasked_params():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 8))
    b = torch.nn.Parameter(a.detach().clone())
    ours = sparse_training.AstAdamW([{"params": [a], "weight_decay": 0.1}], {}, lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": [b], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95),
                            foreach=False)
    for _ in range(4):
        g = torch.randn(3, 8)
        a.grad, b.grad = g.clone(), g.clone()
        ours.param_groups[0]["ast_decay"] = 0.3  # no mask: no decay
        ours.step()
        ref.step()
    assert torch.equal(a, b)


def test_decay_reaches_pruned_weights_only(make_model):
    model, hooks = _prepared(make_model, decay_alpha=0.1, decay_t0=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = hooks.make_optimizer(params, distill.DistillConfig(teacher="t", student="s"))
    assert set(opt.masks) == {mod.weight for mod in hooks.linears.values()}
    before = {name: weight_oi(mod).detach().clone() for name, mod in hooks.linears.items()}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim < 2}
    for p in params:
        p.grad = torch.zeros_like(p)
    hooks.after_backward(6, model, opt)  # lambda = 0.1 * min(6, 4) = 0.4
    assert [g["ast_decay"] for g in opt.param_groups] == pytest.approx([0.4] * len(opt.param_groups))
    opt.step()
    for name, mod in hooks.linears.items():
        keep, w0, w1 = hooks.masks[name], before[name], weight_oi(mod).detach()
        assert torch.equal(w1[keep], w0[keep]), name  # no gradient: kept weights stay
        # pruned ones move toward zero: first step, u = 0.4 W and v^ = u^2, so lr * u / (|u| + eps)
        u = 0.4 * w0[~keep]
        assert torch.allclose((w0 - w1)[~keep], 1e-4 * u / (u.abs() + 1e-8), rtol=1e-4, atol=1e-9), name
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n


def test_mask_update_and_flip_rates(make_model):
    model, hooks = _prepared(make_model, mask_interval=5)
    name, mod = next(iter(hooks.linears.items()))
    keep0 = hooks.masks[name].clone()
    with torch.no_grad():
        w = weight_oi(mod)
        row = w[0, :4].abs()
        w[0, :4] = torch.where(keep0[0, :4], row * 1e-3, row + 10)  # flip the first group: 4 changes
    hooks.before_step(3, model, None)  # not a mask step
    assert torch.equal(hooks.masks[name], keep0)
    hooks.before_step(5, model, None)
    total = sum(m.numel() for m in hooks.masks.values())
    assert hooks.last["flip_prev"] == pytest.approx(4 / total)
    assert hooks.last["flip_init"] == pytest.approx(4 / total)
    assert torch.equal(mod.ast_mask.bool(), hooks.masks[name])
    # per block, for the app's heatmap: the 4 flips are all in block 0, and only this step says so
    in_block0 = sum(m.numel() for n, m in hooks.masks.items() if sparse_training.block_index(n) == 0)
    blocks = hooks.after_step(5, model, None)["flip_blocks"]
    assert blocks == [pytest.approx(4 / in_block0)] + [0.0] * (len(model.model.layers) - 1)
    assert "flip_blocks" not in hooks.after_step(6, model, None)
    with torch.no_grad():  # flip it back: 4 changes vs the previous mask, none vs the initial
        w[0, :4] = torch.where(keep0[0, :4], row + 20, row * 1e-4)
    hooks.before_step(10, model, None)
    assert hooks.last["flip_prev"] == pytest.approx(4 / total)
    assert hooks.last["flip_init"] == 0.0


@pytest.mark.parametrize("margin, kept", [(0.0, [True, True, False, False]),
                                          (0.05, [False, True, True, False])])
def test_mask_margin_keeps_near_ties(make_model, margin, kept):
    model, hooks = _prepared(make_model, mask_interval=1, mask_margin=margin)
    name, mod = next(iter(hooks.linears.items()))
    with torch.no_grad():
        weight_oi(mod)[0, :4] = torch.tensor([1.0, -0.98, 0.97, 0.2])
    hooks.masks[name][0, :4] = torch.tensor([False, True, True, False])  # the current mask
    hooks.before_step(1, model, None)
    # 1.0 beats 0.97 by 3%: a swap without a margin, none with 5% (0.97 * 1.05 > 1.0)
    assert hooks.masks[name][0, :4].tolist() == kept


def test_bad_settings(make_model):
    with pytest.raises(UserError):
        sparse_training.AstHooks(sparse_training.AstConfig(pattern="3:2"))
    with pytest.raises(UserError, match="divisible"):
        _prepared(make_model, slorb_k=48)  # 64 % 48
    with pytest.raises(UserError, match="margin"):
        sparse_training.AstHooks(sparse_training.AstConfig(mask_margin=-0.1))


def test_fsdp_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for FSDP
    with pytest.raises(UserError, match="FSDP"):
        sparse_training.run_ast(sparse_training.AstConfig(model=str(tmp_path / "missing"),
                                                          out=str(tmp_path / "out")))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small deterministic corpus (faster to read than builtin; enough for these runs)."""
    words = ["sparse", "weights", "train", "the", "model", "mask", "group", "of", "four", "keeps", "two"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + f" {i}." for i in range(600)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(lines))
    return str(path)


def _cfg(out, data, **kw):
    base = dict(model="unused", out=str(out), data=data, tokens=32 * 2 * 8, seq_len=32, batch=2,
                lr=1e-3, warmup_steps=2, mask_interval=3, decay_alpha=1e-3, decay_t0=4, slorb_k=16,
                checkpoint_every=0, eval_tokens=64, device="cpu")
    base.update(kw)
    return sparse_training.AstConfig(**base)


def _loaded(model, tokenizer):
    from compact.arch import for_model

    return models.Loaded(model, tokenizer, for_model(model), "tiny")


def _run(cfg, teacher, student_model, tokenizer, should_stop=None):
    hooks = sparse_training.AstHooks(cfg)
    try:
        result = distill.run(sparse_training.distill_config(cfg), hooks=hooks, should_stop=should_stop,
                             teacher=teacher, student=_loaded(student_model, tokenizer))
    except Cancelled as stop:  # a stopped run raises, carrying its result (status "cancelled")
        result = stop.result
    return hooks, result


@pytest.mark.slow
def test_resume_is_exact_and_slorb_checkpoint_reloads(make_model, tokenizer, tmp_path, text_file):
    dense = make_model("llama")
    teacher = _loaded(copy.deepcopy(dense), tokenizer)

    full_student = copy.deepcopy(dense)
    full, res_full = _run(_cfg(tmp_path / "full", text_file), teacher, full_student, tokenizer)
    assert res_full["status"] == "done" and res_full["steps"] == 8

    calls = []
    cut_student = copy.deepcopy(dense)
    cfg = _cfg(tmp_path / "cut", text_file)
    _, res_cut = _run(cfg, teacher, cut_student, tokenizer,
                      should_stop=lambda: calls.append(1) or len(calls) >= 4)
    assert res_cut["status"] == "cancelled" and res_cut["steps"] == 4
    cfg.resume = True
    resumed, res = _run(cfg, teacher, copy.deepcopy(dense), tokenizer)
    assert res["status"] == "done" and res["steps"] == 8

    for name in full.masks:
        assert torch.equal(full.masks[name], resumed.masks[name]), name
        assert torch.equal(full.initial[name], resumed.initial[name]), name
    assert full.last == resumed.last and full.last["flip_init"] > 0  # masks did move
    a = load_file(str(tmp_path / "full/model.safetensors"))
    b = load_file(str(tmp_path / "cut/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = load_file(str(tmp_path / "full/slorb.safetensors"))
    sb = load_file(str(tmp_path / "cut/slorb.safetensors"))
    assert sa.keys() == sb.keys() and len(sa) == 28 and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any("slorb" in k for k in a)

    # the saved checkpoint: exact 2:4 zeros; SLoRB comes back through compact.models.load
    meta = json.loads((tmp_path / "full/compact.json").read_text())
    assert meta["kind"] == "ast" and meta["slorb"]["k"] == 16 and meta["sparsity"]["pattern_ok"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    for name, mod in sparsity.target_linears(plain).items():
        nz = (weight_oi(mod) != 0).reshape(weight_oi(mod).shape[0], -1, 4).sum(-1)
        assert bool((nz == 2).all()), name
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(5))
    reloaded = models.load(str(tmp_path / "full"), device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, full_student(ids).logits)
        assert not torch.allclose(plain(ids).logits, full_student(ids).logits)


def test_resume_with_other_ast_settings_is_refused(make_model, tokenizer, tmp_path, text_file):
    dense = make_model("gpt2")
    teacher = _loaded(copy.deepcopy(dense), tokenizer)
    cfg = _cfg(tmp_path / "run", text_file, slorb_k=0, tokens=32 * 2 * 4)
    calls = []
    _run(cfg, teacher, copy.deepcopy(dense), tokenizer, should_stop=lambda: calls.append(1) or True)
    other = _cfg(tmp_path / "run", text_file, slorb_k=0, tokens=32 * 2 * 4, mask_interval=7, resume=True)
    with pytest.raises(UserError, match="mask_interval"):
        _run(other, teacher, copy.deepcopy(dense), tokenizer)


@pytest.mark.cli
@pytest.mark.slow
def test_cli_sparsify_ast(tiny_checkpoint, tmp_path, text_file):
    out = tmp_path / "ast"
    proc = run_cli("sparsify", "--model", str(tiny_checkpoint("qwen3")), "--out", str(out), "--method", "ast",
                   "--data", text_file,
                   "--tokens", "256", "--seq-len", "32", "--batch", "2", "--eval-tokens", "256",
                   "--slorb-k", "8", "--mask-interval", "2")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["status"] == "done" and res["pattern_ok"] and res["sparsity"] == pytest.approx(0.5)
    assert res["training"]["steps"] == 4 and res["training"]["slorb"]["k"] == 8
    assert res["ppl_after"] > 1 and "flip_init" in res["training"]["ast"]
