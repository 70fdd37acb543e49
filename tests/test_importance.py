"""Minitron importance: planted dead parts score lowest, aggregation math, the scores file."""

import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from compact import arch as arch_mod
from compact import importance
from compact.errors import UserError
from tests.helpers import FAMILIES, SEQ, calib, kill_channel_readout, kill_head, kill_neuron, make_identity


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_dead_parts_score_lowest(family, make_model, tokenizer):
    model = make_model(family, kv_heads=4)  # one head can only be dead when it owns its V
    kill_head(model, 1, 2)
    kill_neuron(model, 2, 17)
    kill_channel_readout(model, 5)
    make_identity(model, 3)
    scores = importance.estimate(model, calib(len(tokenizer)), batch_size=4, depth_ppl=True)

    assert scores.heads[1, 2] == 0 and int(scores.heads.argmin()) == 1 * 4 + 2
    assert scores.neurons[2, 17] == 0 and int(scores.neurons.argmin()) == 2 * 128 + 17
    assert scores.channels[5] == 0 and int(scores.channels.argmin()) == 5
    assert (scores.channels_per_layer[:, 5] == 0).all()
    assert scores.layers_bi[3].abs() < 1e-6 and int(scores.layers_bi.argmin()) == 3
    # Skipping an identity block changes nothing; other layers of a random model may move the
    # loss either way, so only the planted layer's value is certain.
    assert scores.layers_ppl[3].abs() < 1e-6
    assert scores.heads.min() >= 0 and (scores.heads > 0).sum() == scores.heads.numel() - 1
    assert scores.meta["family"] == family and scores.meta["batch_agg"] == "l2"


def test_other_threads_running_the_model_are_not_counted(make_model, tokenizer):
    """The app's generate runs the same cached model in another thread while importance runs
    (ui/common.QUICK): its forward passes are not counted, and it sees the model unchanged."""
    model = make_model("llama")
    blocks = calib(len(tokenizer))
    alone = importance.estimate(model, blocks, batch_size=4)
    probe = blocks[:1, :7]
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    seen = []

    def forward_beside(fraction, message):  # called between batches, the hooks in place
        def forward():
            with torch.no_grad():
                seen.append(model(input_ids=probe).logits)
        thread = threading.Thread(target=forward)
        thread.start()
        thread.join()

    shared = importance.estimate(model, blocks, batch_size=4, progress=forward_beside)
    assert len(seen) == 2 and all(torch.allclose(s, expected) for s in seen)
    for name in ("heads", "neurons", "channels", "channels_per_layer", "layers_bi"):
        assert torch.allclose(getattr(shared, name), getattr(alone, name)), name


def test_neuron_scores_match_the_reference_formula(make_model, tokenizer):
    """Batch L2 of per-sample sequence means of |activation|, computed here by hand."""
    model = make_model("llama")
    blocks = calib(len(tokenizer))
    seen = []
    block = arch_mod.for_model(model).blocks(model)[1]
    handle = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(blocks)
    handle.remove()
    expected = seen[0].abs().mean(1).square().sum(0).sqrt()
    scores = importance.estimate(model, blocks, batch_size=4)
    torch.testing.assert_close(scores.neurons[1], expected, rtol=1e-5, atol=1e-6)
    # Heads: per-token L2 over head_dim of the o_proj input, then the same aggregation.
    seen.clear()
    handle = block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(blocks)
    handle.remove()
    per_head = seen[0].view(*seen[0].shape[:2], 4, 16).norm(dim=-1)
    torch.testing.assert_close(scores.heads[1], per_head.mean(1).square().sum(0).sqrt(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_agg", importance.AGGREGATIONS)
@pytest.mark.parametrize("seq_agg", importance.AGGREGATIONS)
def test_aggregations_do_not_depend_on_batch_size(batch_agg, seq_agg, make_model, tokenizer):
    model = make_model("qwen3")
    blocks = calib(len(tokenizer), n=5)
    one = importance.estimate(model, blocks, batch_agg, seq_agg, batch_size=5)
    split = importance.estimate(model, blocks, batch_agg, seq_agg, batch_size=2)
    for name in ("heads", "neurons", "channels", "channels_per_layer", "layers_bi"):
        torch.testing.assert_close(getattr(one, name), getattr(split, name), rtol=1e-4, atol=1e-6)
    assert torch.isfinite(one.neurons).all() and (one.neurons >= 0).all()


def test_aggregation_values_by_hand():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[-1.0, 2.0], [1.0, 2.0]]])  # (batch, seq, n)
    torch.testing.assert_close(importance._seq_reduce(x, "mean"), torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(importance._seq_reduce(x, "l2"),
                               torch.tensor([[10 ** 0.5, 2.0], [2 ** 0.5, 8 ** 0.5]]))
    torch.testing.assert_close(importance._seq_reduce(x, "var"), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    stat = importance._BatchStat()
    stat.add(torch.tensor([[1.0, 2.0]]))
    stat.add(torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(stat.result("mean"), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(stat.result("l2"), torch.tensor([10 ** 0.5, 8 ** 0.5]))
    torch.testing.assert_close(stat.result("var"), torch.tensor([1.0, 0.0]))


def test_save_and_load_round_trip(tmp_path, make_model, tokenizer):
    scores = importance.estimate(make_model("gpt2"), calib(len(tokenizer), n=2), batch_size=2)
    scores.meta["data"] = "builtin"
    path = scores.save(tmp_path / "s.safetensors")
    back = importance.Scores.load(path)
    for name in (*importance.SCORE_FIELDS, "layers_bi"):
        assert torch.equal(getattr(back, name), getattr(scores, name))
    assert back.layers_ppl is None and back.meta == json.loads(json.dumps(scores.meta))
    assert back.meta["shape"]["hidden"] == 64 and back.meta["samples"] == 2 and back.meta["seq_len"] == SEQ


def test_bad_files_are_user_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    for path, message in ((tmp_path / "missing.safetensors", "not found"),
                          (garbage, "not a readable importance file"),
                          (foreign, "not an importance file")):
        with pytest.raises(UserError, match=message):
            importance.Scores.load(path)


def test_progress_and_cancel(make_model, tokenizer):
    model = make_model("llama")
    seen = []
    importance.estimate(model, calib(len(tokenizer), n=4), batch_size=2, depth_ppl=True,
                        progress=lambda f, msg: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) == 2 + 4
    with pytest.raises(importance.Cancelled):
        importance.estimate(model, calib(len(tokenizer), n=4), batch_size=2, should_stop=lambda: True)
    with pytest.raises(UserError, match="aggregation"):
        importance.estimate(model, calib(len(tokenizer), n=2), batch_agg="max")
