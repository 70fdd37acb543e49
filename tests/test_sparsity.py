import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compact import models, sparsity
from compact.arch import for_model, weight_oi
from compact.errors import Cancelled, UserError
from tests.helpers import FAMILIES, run_cli


def _groups_nonzero(w_oi: torch.Tensor, m: int) -> torch.Tensor:
    out_f, in_f = w_oi.shape
    return (w_oi != 0).reshape(out_f, in_f // m, m).sum(-1)


def _calibration(n: int = 8, seq: int = 32, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- masks and patterns

def test_nm_mask_keeps_largest_magnitudes_per_group():
    w = torch.tensor([[1.0, -5.0, 3.0, 2.0, 0.1, 0.2, -0.3, 0.05],
                      [-9.0, 0.0, 0.5, -0.6, 4.0, 3.0, 2.0, 1.0]])
    keep = sparsity.nm_mask(w, 2, 4)
    assert keep.tolist() == [[False, True, True, False, False, True, True, False],
                             [True, False, False, True, True, True, False, False]]
    score = torch.tensor([[4.0, 3.0, 2.0, 1.0] * 2] * 2)  # an explicit score overrides |W|
    assert sparsity.nm_mask(w, 1, 4, score).tolist() == [[True, False, False, False] * 2] * 2


@pytest.mark.parametrize("pattern", ["3:2", "0:4", "5:4", "4:4", "2", "a:b", "2:1"])
def test_bad_patterns_rejected(pattern):
    with pytest.raises(UserError):
        sparsity.parse_pattern(pattern)


def test_width_not_divisible_rejected(make_model):
    with pytest.raises(UserError, match="not divisible"):
        sparsity.nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(UserError, match="not divisible"):
        sparsity.one_shot(make_model("llama"), "magnitude", 1, 3)


def test_target_linears_exclude_embeddings_and_head(make_model):
    for family in ("llama", "gpt2"):
        model = make_model(family)
        targets = sparsity.target_linears(model)
        assert len(targets) == 4 * (4 if family == "gpt2" else 7)
        arch = for_model(model)
        assert all(t is not arch.embed(model) and t is not arch.lm_head(model) for t in targets.values())


def test_check_pattern_detects_a_dense_group(make_model):
    model = make_model("qwen2")
    sparsity.one_shot(model, "magnitude")
    assert sparsity.check_pattern(model)["ok"]
    name, mod = next(iter(sparsity.target_linears(model).items()))
    with torch.no_grad():
        weight_oi(mod)[3, 4:8] = 1.0  # one group of 4 with 4 non-zeros
    res = sparsity.check_pattern(model)
    assert not res["ok"] and not res["layers"][name]["ok"]
    assert sum(not v["ok"] for v in res["layers"].values()) == 1


# ------------------------------------------------------------------------- one-shot methods

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sparsity.METHODS)
def test_saved_checkpoint_holds_exact_nm(family, method, make_model, tokenizer, tmp_path):
    model = make_model(family)
    arch = for_model(model)
    embed_before = arch.embed(model).weight.detach().clone()
    stats = sparsity.one_shot(model, method, 2, 4, _calibration(vocab=len(tokenizer)))
    assert len(stats["layers"]) == len(sparsity.target_linears(model))
    models.save(model, tokenizer, tmp_path, {"sparsify": method})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for name, mod in sparsity.target_linears(reloaded).items():
        counts = _groups_nonzero(weight_oi(mod), 4)
        assert bool((counts == 2).all()), f"{family}/{method}: {name} breaks 2:4"
    assert sparsity.check_pattern(reloaded)["ok"]
    assert sparsity.check_pattern(reloaded)["sparsity"] == pytest.approx(0.5)
    assert torch.equal(for_model(reloaded).embed(reloaded).weight, embed_before)  # stays dense
    ids = _calibration(2, 16, len(tokenizer), seed=1)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5)


def test_sparsegpt_and_wanda_reduce_to_magnitude_when_inputs_are_isotropic():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    magnitude = sparsity.prune_magnitude(w, 2, 4)
    assert torch.equal(sparsity.prune_wanda(w, torch.full((32,), 3.0), 2, 4), magnitude)
    # H = I: no cross-column error to propagate, and every column weighs the same
    assert torch.allclose(sparsity.prune_sparsegpt(w, torch.eye(32), 2, 4, block=8), magnitude)


def _layer_error(w, pruned, x):
    return float(((x @ (w - pruned).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def test_calibrated_methods_beat_magnitude_on_one_layer():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    scales = torch.exp(torch.randn(128, generator=gen) * 1.5)  # uneven input channels
    mix = torch.randn(128, 128, generator=gen) * 0.3 + torch.eye(128)
    x = (torch.randn(2048, 128, generator=gen) @ mix) * scales  # correlated, as real activations
    h = x.T @ x / len(x)
    err = {"magnitude": _layer_error(w, sparsity.prune_magnitude(w, 2, 4), x),
           "wanda": _layer_error(w, sparsity.prune_wanda(w, (x * x).mean(0), 2, 4), x),
           "sparsegpt": _layer_error(w, sparsity.prune_sparsegpt(w, h, 2, 4), x)}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def _uneven_model(make_model):
    model = make_model("llama", seed=3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms that scale channels by up to ~20x: inputs of uneven scale
        for block in for_model(model).blocks(model):
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.copy_(torch.exp(torch.randn(norm.weight.shape, generator=gen) * 1.2))
    return model


def _reconstruction_error(dense, pruned, calib) -> float:
    """Sum over targeted layers of relative output error, on the pruned model's own inputs."""
    inputs, handles = {}, []
    dense_w = {n: weight_oi(m).detach().clone() for n, m in sparsity.target_linears(dense).items()}
    for name, mod in sparsity.target_linears(pruned).items():
        handles.append(mod.register_forward_hook(
            lambda _m, inp, _o, name=name: inputs.setdefault(name, []).append(
                inp[0].reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        pruned(calib)
    for h in handles:
        h.remove()
    total = 0.0
    for name, mod in sparsity.target_linears(pruned).items():
        x = torch.cat(inputs[name])
        total += _layer_error(dense_w[name], weight_oi(mod).detach(), x)
    return total


def test_calibrated_methods_beat_magnitude_on_a_tiny_model(make_model, tokenizer):
    dense = _uneven_model(make_model)
    calib = _calibration(16, 32, len(tokenizer))
    errors = {}
    for method in sparsity.METHODS:
        pruned = copy.deepcopy(dense)
        sparsity.one_shot(pruned, method, 2, 4, calib)
        errors[method] = _reconstruction_error(dense, pruned, calib)
    assert errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_calibrated_methods_need_data_and_a_known_method(make_model):
    model = make_model("llama")
    with pytest.raises(UserError, match="calibration"):
        sparsity.one_shot(model, "wanda")
    with pytest.raises(UserError, match="unknown"):
        sparsity.one_shot(model, "random")


def test_stop_leaves_later_blocks_dense(make_model, tokenizer):
    model = make_model("mistral")
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1  # after the first block

    with pytest.raises(Cancelled):
        sparsity.one_shot(model, "wanda", blocks=_calibration(vocab=len(tokenizer)), should_stop=stop)
    layers = sparsity.check_pattern(model)["layers"]
    assert all(v["ok"] == name.startswith("model.layers.0.") for name, v in layers.items())


def test_progress_reaches_one(make_model):
    seen = []
    sparsity.one_shot(make_model("gpt2"), "magnitude", progress=lambda f, desc="": seen.append((f, desc)))
    assert seen[-1][0] == 1.0 and "block 4/4" in seen[-1][1]


# ------------------------------------------------------------------------- SLoRB and kernels

def test_slorb_forward_matches_the_papers_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 3)
    keep = sparsity.nm_mask(lin.weight, 2, 4)
    with torch.no_grad():
        lin.weight.mul_(keep)
    w = torch.randn(3, 16)
    s = sparsity.slorb_init(w, sparsity.nm_mask(w, 2, 4), 8)
    dropped = ~sparsity.nm_mask(w, 2, 4)
    by_hand = torch.stack([torch.stack([(w[r, g * 8:(g + 1) * 8] * dropped[r, g * 8:(g + 1) * 8]).sum() / 8
                                        for g in range(2)]) for r in range(3)])
    assert torch.allclose(s, by_hand)
    x = torch.randn(5, 16)
    X = torch.zeros(2, 16)
    X[0, :8], X[1, 8:] = 1, 1  # the fixed 0/1 group matrix of the paper
    expected = lin(x) + (x @ X.T) @ s.T
    sparsity.attach_slorb(lin, s, 8)
    assert torch.allclose(lin(x), expected, atol=1e-6)
    sparsity.detach_slorb(lin)
    assert not hasattr(lin, "slorb_s") and torch.allclose(lin(x), expected - (x @ X.T) @ s.T, atol=1e-6)


def test_slorb_checkpoint_reloads_with_identical_logits(make_model, tokenizer, tmp_path):
    model = make_model("llama")
    dense_w = {n: weight_oi(m).detach().clone() for n, m in sparsity.target_linears(model).items()}
    sparsity.one_shot(model, "magnitude")
    tensors = {n: sparsity.slorb_init(dense_w[n], weight_oi(m) != 0, 16)
               for n, m in sparsity.target_linears(model).items()}
    sparsity.attach_slorb_all(model, tensors, 16)
    entry = sparsity.save_slorb(model, tmp_path, 16)
    models.save(model, tokenizer, tmp_path, {"slorb": entry})
    assert entry["extra_params"] == sparsity.slorb_params(model, 16)["extra_params"]
    ids = _calibration(2, 16, len(tokenizer), seed=2)
    with torch.no_grad():
        expected = model(ids).logits
        loaded = models.load(str(tmp_path), device="cpu")
        assert torch.equal(loaded.model(ids).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        assert sparsity.check_pattern(plain)["ok"]
        assert not torch.allclose(plain(ids).logits, expected)  # SLoRB really contributes
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any("slorb" in k for k in f.keys())  # the base file stays ordinary


def test_semi_structured_needs_cuda(make_model):
    model = make_model("llama")
    sparsity.one_shot(model, "magnitude")
    with pytest.raises(UserError, match="CUDA"):
        sparsity.to_semi_structured(model)


# ------------------------------------------------------------------------- real model, CLI

@pytest.mark.slow
def test_default_model_magnitude_2_4():
    loaded = models.load("default", device="cpu")
    sparsity.one_shot(loaded.model, "magnitude")
    res = sparsity.check_pattern(loaded.model)
    assert res["ok"] and len(res["layers"]) == 30 * 7 and res["sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.cli
def test_cli_sparsify_wanda(tiny_checkpoint, tmp_path):
    words = ["sparse", "weights", "the", "model", "mask", "group", "of", "four", "keeps", "two", "calibrate"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(10)) + f" {i}."
                                    for i in range(800)))
    out = tmp_path / "sparse"
    proc = run_cli("sparsify", "--model", str(tiny_checkpoint("gpt2")), "--out", str(out),
                   "--data", str(corpus),
                   "--method", "wanda", "--samples", "8", "--seq-len", "64", "--eval-tokens", "1024")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["pattern_ok"] and res["sparsity"] == pytest.approx(0.5) and res["layers_checked"] == 16
    assert res["ppl_before"] > 1 and res["ppl_after"] > 1 and res["status"] == "done"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, mod in sparsity.target_linears(reloaded).items():
        assert bool((_groups_nonzero(weight_oi(mod), 4) == 2).all()), name
    assert json.loads((out / "compact.json").read_text())["sparsify"]["method"] == "wanda"


@pytest.mark.parametrize("pattern,message", [("3:2", "not valid"), ("0:4", "not valid"),
                                             ("1:3", "not divisible")])
@pytest.mark.cli
def test_cli_bad_pattern_exits_2(pattern, message, tiny_checkpoint, tmp_path):
    proc = run_cli("sparsify", "--model", str(tiny_checkpoint("llama")), "--out", str(tmp_path / "x"),
                   "--method", "magnitude", "--pattern", pattern)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in proc.stderr


def test_sparsify_saves_in_the_source_dtype_and_scores_what_it_saved(make_model, tokenizer, tmp_path):
    """SparseGPT changes the kept weights; the bfloat16 source's sparse copy is saved in bfloat16,
    and the model it scored (and reports counts of) is that checkpoint, exactly."""
    from compact import sparsify
    from tests.helpers import calib_text

    src = models.save(make_model("llama"), tokenizer, tmp_path / "src", {}, dtype=torch.bfloat16)
    dense = models.load(str(src), device="cpu")
    student = models.Loaded(copy.deepcopy(dense.model), dense.tokenizer, dense.arch, dense.ref,
                            source_dtype=dense.source_dtype)
    cfg = sparsify.SparsifyConfig(model=str(src), out=str(tmp_path / "sparse"), method="sparsegpt",
                                  data=str(calib_text(tmp_path)), samples=4, seq_len=32, eval_tokens=64,
                                  device="cpu")
    result = sparsify.run(cfg, dense=dense, student=student)
    with safe_open(str(tmp_path / "sparse" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    reloaded = models.load(cfg.out, device="cpu")  # float32, from the bfloat16 file
    saved = dict(reloaded.model.named_parameters())
    assert all(torch.equal(p, saved[k]) for k, p in student.model.named_parameters())
    params = sum(p.numel() for p in reloaded.model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in reloaded.model.parameters())
    assert (result["params"], result["nonzero_params"]) == (params, nonzero) and nonzero < params
