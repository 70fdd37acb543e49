"""The real app (python app.py) driven through gradio_client on the default model.

One server and one client session for the module: load, importance, prune, generate, compare,
sparsify, distill, export; then bad inputs, which must come back as errors while the server
keeps serving, and a cancelled job.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from compact import models, shapes
from tests.helpers import FAST_SCORES, plot_array
from ui import prune_tab
from ui.server import serve

# Every test talks to a server that runs the real default model.
pytestmark = [pytest.mark.app, pytest.mark.slow]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # every job here scores its models: on the smaller canonical evaluation of FAST_SCORES
    with serve(tmp_path_factory.mktemp("app"), env=FAST_SCORES) as url:
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def base_shape():
    return models.load("default").shape


@pytest.fixture(scope="module")
def flow(client):
    """Load, importance and prune once; later tests reuse what this session made."""
    card, info = client.predict("default", api_name="/load")
    plots = client.predict("default", "builtin", 4, 64, "l2", "mean", False, api_name="/importance")
    pruned, message = client.predict(24, 384, 1024, 6, "bi", api_name="/prune")
    return {"card": card, "info": info, "importance": plots, "pruned": pruned, "prune_message": message}


def test_load_gives_the_model_card(flow, base_shape):
    info = flow["info"]
    assert (info["family"], info["layers"], info["hidden"], info["heads"], info["kv_heads"], info["ffn"]) == \
        ("llama", 30, 576, 9, 3, 1536)
    assert info["params"] == shapes.count_params(base_shape) == 134_515_008
    assert "134.52 M" in flow["card"]


def test_importance_scores_have_the_model_shape(flow):
    *figures, summary, status, = flow["importance"]
    assert summary["heads"] == [30, 9] and summary["neurons"] == [30, 1536]
    assert summary["channels"] == [576] and summary["channels_per_layer"] == [30, 576]
    assert summary["layers_bi"] == [30] and summary["layers_ppl"] is None
    assert summary["meta"]["samples"] == 4 and summary["meta"]["seq_len"] == 64
    # named as the pickers name it, in the session's folder beside the pruned model
    saved = Path(flow["pruned"]["out"]).parent / status.split("**")[1]
    assert saved.suffix == ".safetensors" and saved.is_file() and "Next:" in status
    assert all(f is not None for f in figures)


def test_prune_gives_the_target_shape_and_count(flow, base_shape):
    result = flow["pruned"]
    target = base_shape.with_targets(layers=24, hidden=384, ffn=1024, heads=6)
    assert result["shape"]["layers"] == 24 and result["shape"]["hidden"] == 384
    assert result["shape"]["ffn"] == 1024 and result["shape"]["heads"] == 6
    assert result["params"] == target.params  # the real model's count equals compact.shapes'
    assert result["source_params"] == base_shape.params
    assert len(result["dropped_layers"]) == 6
    canonical = result["canonical"]  # the workspace's evaluation, its setting in the message
    assert math.isfinite(canonical["ppl_before"]) and math.isfinite(canonical["ppl_after"])
    assert canonical["ppl_after"] > canonical["ppl_before"]  # one-shot pruning without distillation hurts
    assert canonical["setting"] == "builtin validation, 1,024 tokens in blocks of 256"
    assert canonical["setting"] in flow["prune_message"]
    assert (Path(result["out"]) / "config.json").is_file()
    # the Prune tab's readout is arithmetic on the same counts
    assert prune_tab.readout(base_shape, 24, 384, 1024, 6).count(f"{target.params / 1e6:.2f} M") == 1


def test_generate_and_compare_both_models(client, flow):
    text, speed = client.predict("default", PROMPT, 8, 0, 0, False, api_name="/generate")
    assert "Paris" in text and "tokens/s" in speed
    out = flow["pruned"]["out"]
    result = client.predict("default", out, None, None, PROMPT, 8, 0, 1, 0, False, True, api_name="/compare")
    texts, speeds, table, summary = result[:4], result[4:8], result[8], result[9]
    assert texts[0] == text  # same prompt, settings and seed: the same greedy continuation
    assert texts[1].strip() and not texts[2] and not texts[3]
    assert "tokens/s" in speeds[0] and "tokens/s" in speeds[1]
    rows = summary["models"]
    assert [r["model"] for r in rows] == ["default", out]
    assert rows[1]["params"] == flow["pruned"]["params"]
    assert all(math.isfinite(r["ppl"]) and r["new_tokens"] == 8 for r in rows)
    assert len(table["data"]) == 2
    # the canonical scores the prune job computed: one number per model in every tab
    assert rows[0]["ppl"] == flow["pruned"]["canonical"]["ppl_before"]
    assert rows[1]["ppl"] == flow["pruned"]["canonical"]["ppl_after"]
    assert rows[0]["ppl_setting"] == flow["pruned"]["canonical"]["setting"]
    # where the pruned model parts from the original: one shaded piece per token of the original's text
    parts, parted = result[10], rows[1]["divergence"]
    assert [p["token"] for p in parts] and len(parts) == 8 == len(parted["kl"])
    assert all(0 <= p["class_or_confidence"] < 1 for p in parts) and not result[11] and not result[12]
    assert table["data"][1][-1] == ("none" if parted["first_difference"] is None
                                    else f"token {parted['first_difference'] + 1}")
    # greedy: the pruned model's own text is the original's up to its first difference
    first = parted["first_difference"]
    agreed = "".join(p["token"] for p in parts[:first])
    assert texts[1] == texts[0] if first is None else texts[1].startswith(agreed) and texts[1] != texts[0]


def test_sparsify_magnitude_is_exactly_two_four(client, flow):
    # the pruned model, picked explicitly: the session's loaded model stays the default
    pruned = flow["pruned"]
    per_layer, loss, flips, result, message = client.predict(
        pruned["out"], "magnitude", "2:4", "builtin", 4, 64, 512, 4, 1e-4, 0, 10, 0.0, False,
        api_name="/sparsify")
    assert result["model"] == pruned["out"] and result["params"] == pruned["params"]
    # the pruned model's canonical score was cached when it was made
    assert result["canonical"]["before"]["cached"] is True
    assert result["canonical"]["ppl_before"] == pruned["canonical"]["ppl_after"]
    assert result["pattern_ok"] is True and result["layers_not_ok"] == []
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(result["canonical"]["ppl_after"])
    assert "exact" in message
    # the mask view: one saved weight's first 128 x 128, pruned cells empty, 2 of every 4 kept
    weight = "model.layers.3.mlp.down_proj"
    fig = json.loads(client.predict(result, weight, api_name="/sparsify_mask")["plot"])
    z = plot_array(fig["data"][0]["z"])
    assert z.shape == (128, 128) and "every group of 4 keeps at most 2" in fig["layout"]["title"]["text"]
    assert (np.isnan(z).reshape(128, 32, 4).sum(-1) >= 2).all()


def test_sparsify_ast_with_slorb_and_margin(client):
    # 4 steps of 2 x 64 tokens, masks every 2 steps: the AST settings reach the run, the result
    # keeps 2:4, and the saved SLoRB checkpoint is what was scored (reloaded from disk)
    per_layer, loss, flips, result, message = client.predict(
        "default", "ast", "2:4", "builtin", 4, 64, 512, 2, 1e-4, 16, 2, 0.05, False, api_name="/sparsify")
    training = result["training"]
    assert training["status"] == "done" and training["steps"] == 4
    assert training["ast"]["mask_margin"] == 0.05 and training["ast"]["mask_interval"] == 2
    assert training["slorb"]["k"] == 16
    assert result["pattern_ok"] is True and result["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (Path(result["out"]) / "slorb.safetensors").is_file()
    assert math.isfinite(result["canonical"]["ppl_after"])
    # mask flips per block at the one mask update (after 2 steps, so in step 3), and the decay under it
    heatmap, decay = json.loads(flips["plot"])["data"]
    assert heatmap["type"] == "heatmap" and heatmap["x"] == [3]
    assert plot_array(heatmap["z"]).shape == (30, 1) and len(decay["y"]) == 4


def test_distill_a_few_steps(client, flow):
    out = flow["pruned"]["out"]
    loss, message, result = client.predict("default", out, "builtin", 512, 64, 2, 1e-4, 1.0, 1.0, 0.0, 0.0,
                                           False, api_name="/distill")
    assert result["status"] == "done" and result["steps"] == 4
    assert math.isfinite(result["loss"]) and math.isfinite(result["canonical"]["ppl_after"])
    assert "Saved as" in message and "Next:" in message
    assert "validation" in message  # the canonical setting, named
    assert (Path(result["out"]) / "model.safetensors").is_file()


def test_export_command_and_zip(client, flow):
    out = flow["pruned"]["out"]
    command, what = client.predict(out, api_name="/export_command")
    assert "python -m compact importance --model default" in command
    assert "python -m compact prune --model default" in command
    assert "--layers 24 --hidden 384 --ffn 1024 --heads 6" in command
    # the runs store's chain from the root model: the importance run the prune read, then the prune
    chain = client.predict(out, api_name="/export_reproduce").splitlines()
    assert chain[1].startswith("python -m compact reproduce ") and chain[1].endswith(" --out remade")
    steps = chain[3:]
    assert [line.split()[3] for line in steps] == ["importance", "prune"]
    assert "--out remade/steps/1-importance.safetensors" in steps[0]
    assert "--importance remade/steps/1-importance.safetensors" in steps[1]
    assert f"--out remade/{Path(out).name}" in steps[1]
    archive = client.predict(out, api_name="/export_zip")
    names = zipfile.ZipFile(archive).namelist()
    assert any(n.endswith("config.json") for n in names) and any(n.endswith(".safetensors") for n in names)


def test_pareto_and_loss_curves_of_this_sessions_runs(client, flow):
    # The prune and distill tests above left finished runs in this session.
    plot, note = client.predict(False, api_name="/runs_pareto")
    fig = json.loads(plot["plot"])
    names = [t.get("name") for t in fig["data"]]
    assert names == ["models", "frontier"]
    # every model on the canonical scores its job computed: the loaded root and the pruned model
    models_trace, pruned = fig["data"][0], flow["pruned"]
    points = dict(zip(models_trace["customdata"], zip(models_trace["x"], models_trace["y"], strict=True),
                      strict=True))
    assert points["default"] == (134_515_008, pruned["canonical"]["ppl_before"])
    assert points[pruned["out"]] == (pruned["params"], pruned["canonical"]["ppl_after"])
    assert len(points) >= 4  # and the sparse and distilled models of the tests above
    assert "1,024 tokens" in fig["layout"]["yaxis"]["title"]["text"]
    # a point picked on the plot becomes Compare's first compressed model
    slot, picked = client.predict(pruned["out"], api_name="/pareto_pick")
    assert slot["value"] == pruned["out"] and "Compare" in picked
    # the lineage: the root with its score, the pruned model under it with its own
    tree = client.predict(api_name="/runs_lineage")
    assert f"default (root) · ppl {pruned['canonical']['ppl_before']:.2f}" in tree
    assert f"ppl {pruned['canonical']['ppl_after']:.2f} · → {Path(pruned['out']).name}" in tree
    curves = json.loads(client.predict("", api_name="/runs_loss_curves")["plot"])
    assert any(t.get("name", "").endswith("distill") and len(t["x"]) >= 1 for t in curves["data"])
    with pytest.raises(Exception, match="whole numbers"):
        client.predict("one,two", api_name="/runs_loss_curves")


def test_experiment_kd_vs_ce_in_one_click(client, flow):
    table, fig, message = client.predict("default", "kd-vs-ce", 0.9, 32, 16, 2, 2, 64, "builtin",
                                         api_name="/experiment")
    rows = [dict(zip(table["headers"], r, strict=True)) for r in table["data"]]
    assert [r["arm"] for r in rows] == ["logit distillation (KL)", "cross-entropy only"]
    assert all(math.isfinite(r["loss_before"]) and math.isfinite(r["loss_after"]) and r["tokens"] == 32
               for r in rows)
    assert all(math.isfinite(r["canonical_ppl"]) for r in rows)  # the arms on the workspace's scale
    assert "results.md" in message
    recorded = client.predict(api_name="/runs")
    kind = recorded["headers"].index("kind")
    kinds = [r[kind] for r in recorded["data"]]
    # The whole experiment and each of its two arms are runs of this session.
    assert kinds.count("experiment:kd-vs-ce") == 3


def test_bad_inputs_are_errors_and_the_server_keeps_serving(client, flow):
    with pytest.raises(AppError, match="outside the folders"):
        client.predict("/etc", api_name="/load")
    with pytest.raises(AppError, match="not a folder, a .gguf file or a Hub id"):
        client.predict("no such model!", api_name="/load")
    with pytest.raises(AppError, match="multiple of the 3 KV heads"):
        client.predict(30, 576, 1536, 4, "bi", api_name="/prune")
    with pytest.raises(AppError, match="own shape"):
        client.predict(30, 576, 1536, 9, "bi", api_name="/prune")
    with pytest.raises(AppError, match="prompt is empty"):
        client.predict("default", None, None, None, "", 8, 0, 1, 0, False, False, api_name="/compare")
    with pytest.raises(AppError, match="unknown data source"):
        client.predict(None, "nowhere", 4, 64, "l2", "mean", False, api_name="/importance")
    with pytest.raises(AppError, match="pattern"):
        client.predict("default", "magnitude", "3:2", "builtin", 4, 64, 512, 4, 1e-4, 0, 10, 0.0, False,
                       api_name="/sparsify")
    with pytest.raises(AppError, match="token"):
        client.predict(flow["pruned"]["out"], "me/model", "", True, api_name="/push")
    # offline here: a clear error; with a network (CI) the fake token fails at the Hub instead
    with pytest.raises(AppError, match="cannot reach the Hugging Face Hub|upload to me/model failed"):
        client.predict(flow["pruned"]["out"], "me/model", "hf_not_a_token", True, api_name="/push")
    card, info = client.predict("default", api_name="/load")
    assert info["layers"] == 30


def test_cancel_stops_a_running_job(client):
    job = client.submit(None, "builtin", 64, 256, "l2", "mean", True, api_name="/importance")
    for _ in range(600):
        reply = client.predict(api_name="/cancel")
        if reply.startswith("Stopping"):
            break
        if job.done():
            pytest.fail("the job ended before it could be cancelled")
        import time
        time.sleep(0.05)
    else:
        pytest.fail("the job never started")
    with pytest.raises(AppError, match="cancelled"):
        job.result(timeout=300)
    assert client.predict(api_name="/cancel") == "No job is running."


def test_importance_and_prune_take_the_picked_model(client, flow):
    """Importance names its model (here the pruned one, not the loaded default); Prune then
    works on that model, and its canonical score before is the one made when it was pruned."""
    pruned = flow["pruned"]
    *figures, summary, status = client.predict(pruned["out"], "builtin", 2, 32, "l2", "mean", False,
                                               api_name="/importance")
    assert summary["heads"] == [24, 6] and summary["neurons"] == [24, 1024]
    result, message = client.predict(20, 384, 1024, 6, "bi", api_name="/prune")
    assert result["model"] == pruned["out"] and result["shape"]["layers"] == 20
    assert result["canonical"]["ppl_before"] == pruned["canonical"]["ppl_after"]
    assert result["canonical"]["before"]["cached"] is True
    tree = client.predict(api_name="/runs_lineage")
    line = next(x for x in tree.splitlines() if x.endswith(Path(result["out"]).name))
    assert line.startswith("    └─ ") and line.index("└") == 4  # one level under the pruned model's run
