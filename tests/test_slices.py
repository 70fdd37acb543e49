"""A training job as time-bounded slices (ZeroGPU) ends exactly where the unsliced job ends."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from compact import distill, models, slices
from compact.errors import Cancelled
from tests.helpers import calib_text
from ui import lanes


@pytest.fixture
def job(tmp_path, tiny_checkpoint, make_model, tokenizer):
    student = tmp_path / "student"
    models.save(make_model("llama", seed=1, layers=2, hidden=32, ffn=64, heads=2, kv_heads=1), tokenizer,
                student, {})

    def config(out, **kw):
        base = dict(teacher=str(tiny_checkpoint("llama")), student=str(student),
                    data=str(calib_text(tmp_path)), out=str(tmp_path / out), tokens=8 * 2 * 32,
                    seq_len=32, batch=2, lr=1e-3, warmup_steps=2, ce_weight=0.5, eval_tokens=64,
                    checkpoint_every=0)
        return distill.DistillConfig(**{**base, **kw})
    return config


def test_a_sliced_distillation_equals_the_unsliced_one(job, tmp_path):
    # the ZeroGPU path of the app (ui/lanes.py): each slice is a spaces.GPU call, which outside
    # ZeroGPU runs the function as it is; `spaces` is installed so its decorator is the real one
    assert importlib.util.find_spec("spaces") is not None
    whole = distill.run(job("whole"))
    seen = []
    cfg = job("sliced")
    budget = slices.duration(cfg) - slices.LOAD_S
    assert 0 < budget < 0.1  # 512 tokens at the estimate's speed: a fraction of the run's time
    sliced = slices.run_sliced(functools.partial(lanes._gpu_slice, distill.run), cfg, on_event=seen.append)
    assert sliced["slices"] >= 2 and sliced["status"] == "done" and sliced["steps"] == whole["steps"] == 8
    steps = [e["step"] for e in seen if e.get("kind") == "step"]
    assert steps == list(range(1, 9))  # every step once, across the slices
    assert max(e["slice"] for e in seen) == sliced["slices"]
    assert sliced["loss"] == whole["loss"] and sliced["val_loss_after"] == whole["val_loss_after"]
    want, got = load_file(str(tmp_path / "whole" / "model.safetensors")), \
        load_file(str(tmp_path / "sliced" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_cancel_between_slices_keeps_the_checkpoint(job, tmp_path):
    cfg = job("cancelled")
    calls = []

    def one(c):
        calls.append(c.resume)
        return slices.one_slice(distill.run, c, 0.0)  # a budget of nothing: one step per slice

    with pytest.raises(Cancelled, match="after slice 2") as stop:
        slices.run_sliced(one, cfg, should_stop=lambda: len(calls) >= 2)
    assert calls == [False, True] and stop.value.result["steps"] == 2
    assert (tmp_path / "cancelled" / "checkpoint" / "progress.json").is_file()
    resumed = distill.run(job("cancelled", resume=True))
    assert resumed["status"] == "done" and resumed["steps"] == 8


def test_slice_duration_follows_the_job_size(monkeypatch, job):
    monkeypatch.setenv("COMPACT_ZERO_SLICE_S", "90")
    assert slices.duration(job("a")) == pytest.approx(slices.LOAD_S + 512 / slices.ZERO_TOKENS_PER_S)
    assert slices.duration(job("b", tokens=10**7)) == 90
