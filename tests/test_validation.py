"""Importance metrics against the ablation truth (compact.validation, compact.metrics), pruning by
any metric, and GQA head scores."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from compact import importance, metrics, prune, validation
from compact.errors import UserError
from compact.evaluate import loss_on
from tests.helpers import (
    FAMILIES,
    calib,
    calib_text,
    kill_channel_readout,
    kill_head,
    kill_neuron,
    make_identity,
    run_cli,
    tiny_model,
)

VOCAB = 512  # a small vocabulary keeps the LM head, and each ablation pass, cheap


def _scores(model, blocks):
    scores = importance.estimate(model, blocks, batch_size=4)
    scores.metrics = metrics.extra(model, blocks, batch_size=4)
    return scores


def test_ranks_share_ties_and_spearman_is_exact():
    assert validation.ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert validation.spearman(a, a * 10 + 7) == pytest.approx(1.0, abs=1e-12)
    assert validation.spearman(a, -a.exp()) == pytest.approx(-1.0, abs=1e-12)
    # ranks of b: 1, 2, 3.5, 5, 3.5 -> covariance 8 over sqrt(10 x 9.5)
    b = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])
    assert validation.spearman(a, b) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert math.isnan(validation.spearman(a, torch.ones(5)))


def test_dead_units_have_zero_truth_and_every_metric_ranks_them_last():
    model = tiny_model("llama", VOCAB, kv_heads=4)  # a head owns its V: it can be dead alone
    kill_head(model, 1, 2)
    kill_neuron(model, 2, 17)
    kill_channel_readout(model, 5)
    make_identity(model, 3)
    blocks = calib(VOCAB, n=4)
    scores = _scores(model, blocks)
    summary = validation.validate(model, blocks, scores, list(validation.AXES), sample=8, batch_size=2)

    # Removing the dead head changes nothing; layer 3 writes nothing, so its heads neither.
    heads = scores.truth["heads"]["loss"].view(4, 4)
    assert heads[1, 2] == 0 and (heads[3] == 0).all() and (heads[:3].abs() > 0).sum() == 11
    for name in metrics.WIDTH_METRICS["heads"]:
        assert int(scores.width("heads", name)[:3].argmin()) == 1 * 4 + 2, name
    for name in metrics.WIDTH_METRICS["neurons"]:
        assert int(scores.width("neurons", name).argmin()) == 2 * 128 + 17, name
    assert int(scores.width("channels", "taylor").argmin()) == 5
    assert scores.truth["layers"]["loss"][3] == 0
    # The dead neuron and channel, checked by hand (the seeded sample need not hold them).
    assert validation.truth(model, blocks, "neurons", torch.tensor([2 * 128 + 17]), 2).item() == 0
    assert validation.truth(model, blocks, "channels", torch.tensor([5]), 2).item() == 0
    assert summary["heads"]["units"] == 16 and summary["neurons"]["units"] == 8
    assert summary["layers"]["blocks"] == 4 and set(summary["layers"]["spearman"]) == {"bi", "angular"}
    assert set(summary["heads"]["spearman"]) == set(metrics.WIDTH_METRICS["heads"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_ranks_planted_dead_units_last_by_every_metric(family, make_model, tokenizer):
    """Fused projections (Conv1D, q|k|v), OPT's flattened MLP: the same planted checks, and the
    truth of the dead head is exactly 0."""
    model = make_model(family, kv_heads=4)  # the real vocabulary: some configs pad beyond 512
    kill_head(model, 1, 2)
    kill_neuron(model, 2, 17)
    kill_channel_readout(model, 5)
    blocks = calib(len(tokenizer), n=6)  # OPT's ReLUs: with fewer tokens other neurons stay silent
    scores = _scores(model, blocks)
    for name in metrics.WIDTH_METRICS["heads"]:
        assert int(scores.width("heads", name).argmin()) == 1 * 4 + 2, name
    for name in metrics.WIDTH_METRICS["neurons"]:
        assert int(scores.width("neurons", name).argmin()) == 2 * 128 + 17, name
    assert int(scores.width("channels", "taylor").argmin()) == 5
    assert validation.truth(model, blocks, "heads", torch.tensor([1 * 4 + 2]), 2).item() == 0


def test_truth_with_replayed_blocks_equals_full_passes():
    """Blocks before the ablated one replay the full pass's outputs: the loss is the one a full
    pass with the same ablation gives (heads: a hand-made hook; layers: layer_loss_increase)."""
    model = tiny_model("llama", VOCAB)
    blocks = calib(VOCAB, n=4)
    got = validation.truth(model, blocks, "heads", torch.tensor([2 * 4 + 1, 3 * 4 + 0]), batch_size=2)
    base = loss_on(model, blocks, 2)
    expected = []
    for layer, head in ((2, 1), (3, 0)):
        def zero(module, args, h=head):
            x = args[0].clone()
            x[..., h * 16:(h + 1) * 16] = 0
            return (x,)
        handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero)
        expected.append(loss_on(model, blocks, 2) - base)
        handle.remove()
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    layers = validation.truth(model, blocks, "layers", torch.arange(4), batch_size=2)
    torch.testing.assert_close(layers, importance.layer_loss_increase(model, blocks, 2), atol=1e-6, rtol=0)
    # The model is left as it was: no replay or hook remains.
    assert all("forward" not in vars(b) for b in model.model.layers)
    assert loss_on(model, blocks, 2) == base


def test_gqa_zero_values_zero_exactly_their_query_heads_and_identical_queries_tie():
    model = tiny_model("llama", VOCAB, heads=4, kv_heads=2)  # query heads 0, 1 | 2, 3
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.v_proj.weight[16:32] = 0  # KV group 1's values
        q = model.model.layers[2].self_attn.q_proj.weight
        q[16:32] = q[0:16]  # query head 1 = query head 0, inside group 0
    scores = importance.estimate(model, calib(VOCAB, n=4), batch_size=2)
    assert scores.heads[1, 2] == 0 and scores.heads[1, 3] == 0
    assert (scores.heads[1, :2] > 0).all() and (scores.heads[[0, 2, 3]] > 0).all()
    assert scores.heads[2, 0] == scores.heads[2, 1] and scores.heads[2, 0] != scores.heads[2, 2]


def test_prune_by_any_metric_and_the_scores_file_keeps_them(tmp_path):
    model = tiny_model("llama", VOCAB)
    blocks = calib(VOCAB, n=4)
    scores = _scores(model, blocks)
    validation.validate(model, blocks, scores, ["heads"], batch_size=2)
    loaded = importance.Scores.load(scores.save(tmp_path / "s.safetensors"))
    for axis, by_name in scores.metrics.items():
        for name, t in by_name.items():
            assert torch.equal(loaded.metrics[axis][name], t)
    assert torch.equal(loaded.truth["heads"]["units"], torch.arange(16))
    assert loaded.meta["validation"]["heads"]["units"] == 16

    cfg = prune.PruneConfig(model="m", out="o", heads=2, head_metric="taylor", neuron_metric="wanda",
                            channel_metric="taylor")
    ranked = cfg.ranked(loaded)
    p = prune.plan(ranked, importance_shape(model), heads=2, ffn=64, hidden=48)
    taylor = scores.metrics["heads"]["taylor"]
    for layer, kept in enumerate(p.heads):  # the best taylor head of each KV group of 2
        assert kept == [g * 2 + int(taylor[layer, g * 2:(g + 1) * 2].argmax()) for g in range(2)]
    wanda = scores.metrics["neurons"]["wanda"]
    assert p.neurons[0] == sorted(wanda[0].argsort(descending=True)[:64].tolist())
    channels = scores.metrics["channels_per_layer"]["taylor"].sum(0) + ranked.channels_final
    assert p.channels == sorted(channels.argsort(descending=True)[:48].tolist())
    plain = importance.estimate(model, blocks, batch_size=4)
    with pytest.raises(UserError, match="--extra-metrics"):
        cfg.ranked(plain)


def importance_shape(model):
    from compact import arch as arch_mod

    return arch_mod.for_model(model).shape(model.config)


def test_validate_axes_are_checked(capsys, tmp_path):
    from compact.cli import main

    assert validation.parse_axes("heads, layers,heads") == ["heads", "layers"]
    with pytest.raises(UserError, match="unknown axis 'head'"):
        validation.parse_axes("head")
    # On the command line: exit 2 and one line, before any model is loaded.
    assert main(["importance", "--model", str(tmp_path / "none"), "--validate", "heads,rows",
                 "--out", str(tmp_path / "s.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown axis 'rows' to validate: use any of "
                                               "heads, neurons, channels, layers")


@pytest.mark.cli
def test_cli_validate_adds_the_validation(tiny_checkpoint, tmp_path):
    out = tmp_path / "s.safetensors"
    r = run_cli("importance", "--model", str(tiny_checkpoint("llama")), "--data", str(calib_text(tmp_path)),
                "--samples", "4", "--seq-len", "16", "--batch", "4", "--validate", "heads,layers,neurons",
                "--validate-units", "5", "--validate-blocks", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    v = result["validation"]
    assert set(v) == {"heads", "layers", "neurons"} and result["extra_metrics"] is True
    assert v["heads"]["units"] == 4 * 4 and v["heads"]["blocks"] == 2 and v["neurons"]["units"] == 5
    assert set(v["heads"]["spearman"]) == set(metrics.WIDTH_METRICS["heads"])
    with safe_open(str(out), framework="pt") as f:
        assert {"truth.heads.loss", "metric.heads.taylor", "layers_angular"} <= set(f.keys())


def test_importance_tab_plots_each_metric_against_the_truth():
    from ui import importance_tab

    model = tiny_model("llama", VOCAB)
    blocks = calib(VOCAB, n=2)
    scores = _scores(model, blocks)
    assert len(importance_tab.validation_figure(scores).data) == 0  # not validated: a message
    summary = validation.validate(model, blocks, scores, ["heads", "layers"], batch_size=2)
    fig = importance_tab.validation_figure(scores)
    assert len(fig.data) == len(metrics.WIDTH_METRICS["heads"]) + 2  # + bi, angular
    first = fig.data[0]
    assert torch.equal(torch.tensor(first.y), scores.truth["heads"]["loss"])
    assert torch.allclose(torch.tensor(first.x), scores.heads.flatten())
    titles = [a.text for a in fig.layout.annotations]
    assert f"heads: taylor (ρ = {summary['heads']['spearman']['taylor']:.2f})" in titles
