"""Distillation: the student's own loss, exact resume, the CLI's checks (losses: test_losses.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from compact import distill, models
from compact.arch import for_model
from compact.errors import Cancelled
from tests.helpers import FAMILIES, ROOT, run_cli


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """60k characters of the Python reference (fast to tokenize, unlike the whole builtin corpus)."""
    import pydoc_data.topics as topics

    path = tmp_path_factory.mktemp("distill-text") / "text.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:60_000])
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_student_module_cross_entropy_equals_the_models_own_loss(family, make_model):
    """The chunked head on the base model's final states gives the full model's logits' loss,
    in every family (this is what lets the losses skip the models' own LM-head call)."""
    from compact import evaluate

    model = make_model(family, seed=0)
    cfg = distill.DistillConfig(teacher="t", student="s", out="-", chunk=5)
    module = distill.DistillModule(model, for_model(model), cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    got = distill.validation_loss(_NoAccelerator(), module, ids, batch=2)
    assert abs(got - evaluate.loss_on(model, ids)) < 1e-5


class _NoAccelerator:
    device = torch.device("cpu")


# -- the loop ----------------------------------------------------------------------------------

def _loaded(model, tokenizer, ref, meta=None):
    return models.Loaded(model, tokenizer, for_model(model), ref, meta or {})


def _with_dropout(model, p=0.1):
    """Attention dropout makes the run depend on the RNG, so exact resume must restore it."""
    for block in model.model.layers:
        block.self_attn.attention_dropout = p
    return model


def _config(pair, out, **kw):
    base = dict(teacher="tiny-teacher", student="tiny-student", data=str(pair[2]), out=str(out),
                tokens=4 * 2 * 2 * 32, seq_len=32, batch=2, grad_accum=2, lr=1e-3, warmup_steps=2,
                ce_weight=0.5, hidden_weight=1.0, temperature=2.0, eval_tokens=64, chunk=16,
                checkpoint_every=0, weight_decay=0.01)
    return distill.DistillConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pair(make_model, tokenizer, text_file):
    """(teacher, student, data): a tiny teacher and a narrower, shallower student."""
    teacher = make_model("llama", seed=0)
    student = _with_dropout(make_model("llama", seed=1, layers=2, hidden=32, ffn=64, heads=2, kv_heads=1))
    return teacher, student, text_file


def _run(cfg, pair, tokenizer, **kw):
    """distill.run's result; a stopped run raises Cancelled carrying it (status "cancelled")."""
    teacher, student, _ = pair
    try:
        return distill.run(cfg, teacher=_loaded(teacher, tokenizer, "tiny-teacher"),
                           student=_loaded(copy.deepcopy(student), tokenizer, "tiny-student"), **kw)
    except Cancelled as stop:
        return stop.result


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _steps(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_student_is_saved_in_its_source_dtype(tmp_path, pair, tokenizer):
    """Trained in float32, saved in the dtype the student's checkpoint records: reloaded in that
    dtype it is the trained student, exactly."""
    teacher, student, _ = pair
    loaded = _loaded(copy.deepcopy(student), tokenizer, "tiny-student")
    loaded.source_dtype = torch.bfloat16
    result = distill.run(_config(pair, tmp_path / "out"), teacher=_loaded(teacher, tokenizer, "tiny-teacher"),
                         student=loaded)
    assert result["params"] == sum(p.numel() for p in student.parameters())
    assert {t.dtype for t in _weights(tmp_path / "out").values()} == {torch.bfloat16}
    assert next(loaded.model.parameters()).dtype == torch.float32  # the master weights in memory
    reloaded = models.load(str(tmp_path / "out"), device="cpu", dtype="bfloat16").model
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, copy.deepcopy(loaded.model).to(torch.bfloat16)(ids).logits)


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path, pair, tokenizer):
    """Uninterrupted vs cancelled at step 2 + resumed vs crashed after the step-2 checkpoint +
    resumed: the same weights (torch.equal, every tensor) and the same per-step losses."""
    full = _run(_config(pair, tmp_path / "full"), pair, tokenizer)
    assert full["status"] == "done" and full["steps"] == 4

    cut = tmp_path / "cut"
    part = _run(_config(pair, cut), pair, tokenizer, should_stop=lambda: len(_steps(cut)) >= 2)
    assert part["status"] == "cancelled" and part["steps"] == 2
    assert (cut / "checkpoint" / "progress.json").exists() and not (cut / "model.safetensors").exists()
    settings = json.loads((cut / "run.json").read_text())
    assert settings["compile"] == "off"
    # as a compact before --compile had modes wrote it: still the same settings
    (cut / "run.json").write_text(json.dumps({**settings, "compile": False}))
    resumed = _run(_config(pair, cut, resume=True), pair, tokenizer)
    assert resumed["status"] == "done" and resumed["steps"] == 4

    crash = tmp_path / "crash"

    def die_at_3(event):
        if event.get("kind") == "step" and event["step"] == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(_config(pair, crash, checkpoint_every=2), pair, tokenizer, on_event=die_at_3)
    assert len(_steps(crash)) == 3  # step 3 was logged after the step-2 checkpoint
    _run(_config(pair, crash, checkpoint_every=2, resume=True), pair, tokenizer)

    want = _weights(tmp_path / "full")
    for folder in (cut, crash):
        got = _weights(folder)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (folder.name, name)
        assert [s["loss"] for s in _steps(folder)] == [s["loss"] for s in _steps(tmp_path / "full")]
        assert not (folder / "checkpoint").exists()
    assert resumed["val_loss_after"] == full["val_loss_after"]
    meta = json.loads((tmp_path / "full" / "compact.json").read_text())
    assert meta["teacher"] == "tiny-teacher" and meta["tokens"] == 4 * 2 * 2 * 32
    assert meta["hyperparameters"]["temperature"] == 2.0 and meta["validation"]["ppl_after"] > 1


def test_student_equal_to_teacher_has_zero_kl(tmp_path, pair, tokenizer):
    teacher, _, _ = pair
    events = []
    cfg = _config(pair, tmp_path / "same", tokens=2 * 2 * 2 * 32, ce_weight=0.0, hidden_weight=1.0)
    distill.run(cfg, teacher=_loaded(teacher, tokenizer, "t"),
                student=_loaded(copy.deepcopy(teacher), tokenizer, "s"), on_event=events.append)
    first = next(e for e in events if e["kind"] == "step")
    assert first["kd"] < 1e-6 and first["hidden"] < 1e-10  # measured before the first update
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())


def test_run_checks_its_inputs(tmp_path, pair, tokenizer, make_model):
    teacher, student, _ = pair
    t = _loaded(teacher, tokenizer, "t")
    with pytest.raises(models.UserError, match="token budget"):
        distill.run(_config(pair, tmp_path / "a", tokens=0), teacher=t,
                    student=_loaded(student, tokenizer, "s"))
    with pytest.raises(models.UserError, match="do not fill one optimizer step"):
        distill.run(_config(pair, tmp_path / "b", tokens=64), teacher=t,
                    student=_loaded(student, tokenizer, "s"))
    other = make_model("llama", seed=2, layers=1)
    other.resize_token_embeddings(len(tokenizer) + 8)
    with pytest.raises(models.UserError, match="vocabularies differ"):
        distill.run(_config(pair, tmp_path / "c"), teacher=t, student=_loaded(other, tokenizer, "s"))


def test_report_to_tensorboard_writes_each_steps_losses(tmp_path, pair, tokenizer):
    """--report-to tensorboard: accelerate's tracker writes real event files under out/logs whose
    scalars are the steps' losses in metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    _run(_config(pair, out, report_to="tensorboard"), pair, tokenizer)
    logs = out / "logs" / "compact-distill"
    assert list(logs.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logs))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    steps = _steps(out)
    assert [e.step for e in loss] == [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    assert {"train/kd", "train/ce", "train/lr", "train/tokens_per_s"} <= set(acc.Tags()["scalars"])


def test_report_to_a_tracker_that_is_not_installed_is_a_user_error(tmp_path, pair, tokenizer):
    import accelerate.utils

    if accelerate.utils.is_wandb_available():
        pytest.skip("wandb is installed here")
    with pytest.raises(models.UserError, match="--report-to wandb needs the 'wandb' package"):
        _run(_config(pair, tmp_path / "w", report_to="wandb"), pair, tokenizer)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_few_steps_lower_the_validation_loss_of_a_pruned_model(tmp_path, make_model, tokenizer, text_file):
    """A tiny model with 2 of its 4 layers cut, distilled for 6 steps toward its teacher. The
    random teacher is first corrected (fine-tuned on the data, 2408.11796), so that it knows
    something the pruned student can learn."""
    from compact import prune

    teacher = make_model("llama", seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned, plan = prune.trim_with_plan(teacher, None, drop_layers=[1, 2])
    student = _loaded(pruned, tokenizer, "pruned", {"kept_layers": plan.layers})
    out = tmp_path / "d"
    cfg = distill.DistillConfig(teacher="tiny", student="pruned", data=str(text_file), out=str(out),
                                tokens=6 * 4 * 32, seq_len=32, batch=4, lr=1e-2, warmup_steps=1,
                                teacher_correction_steps=12, eval_tokens=512, checkpoint_every=0)
    result = distill.run(cfg, teacher=_loaded(teacher, tokenizer, "tiny"), student=student)
    assert result["teacher_val_loss"] < result["val_loss_before"] - 1.0, result  # the correction worked
    assert result["val_loss_after"] < result["val_loss_before"] - 1.0, result
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # caller's teacher
    assert json.loads((out / "teacher_corrected" / "compact.json").read_text())["steps"] == 12
    # the saved student reloads in plain transformers with the trained weights
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, pruned.eval()(ids).logits, atol=1e-5)


# -- the command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, make_model, tokenizer, text_file):
    root = tmp_path_factory.mktemp("distill-cli")
    text = text_file
    teacher = models.save(make_model("llama", seed=0), tokenizer, root / "teacher", {})
    student = models.save(make_model("llama", seed=3, layers=2, ffn=64), tokenizer, root / "student", {})
    wide = make_model("llama", seed=4, layers=1)
    wide.resize_token_embeddings(len(tokenizer) + 64)
    vocab = models.save(wide, tokenizer, root / "vocab", {})
    # The same vocabulary size with two token ids swapped: a different tokenizer.
    other = models.save(make_model("llama", seed=5, layers=1), tokenizer, root / "othertok", {})
    spec = json.loads((other / "tokenizer.json").read_text())
    v = spec["model"]["vocab"]
    v["Ġthe"], v["Ġand"] = v["Ġand"], v["Ġthe"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    return {"root": root, "text": text, "teacher": teacher, "student": student, "vocab": vocab,
            "othertok": other}


def _distill_args(f, out, *extra):
    return ["distill", "--teacher", str(f["teacher"]), "--student", str(f["student"]), "--data",
            str(f["text"]), "--out", str(out), "--tokens", "512", "--seq-len", "32", "--batch", "4",
            "--eval-tokens", "256", *extra]


@pytest.mark.cli
@pytest.mark.slow
def test_cli_distills_and_guards_the_output_folder(cli_files):
    out = cli_files["root"] / "run"
    proc = run_cli(*_distill_args(cli_files, out, "--ce-weight", "0.5"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "done" and result["steps"] == 4 and result["tokens"] == 512
    assert result["val_ppl_before"] > 1 and result["val_ppl_after"] > 1 and result["tokens_per_s"] > 0
    assert "step 4/4" in proc.stderr and "tok/s" in proc.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    models.load(str(out))  # an ordinary checkpoint

    for extra, message in (([], "already holds another run"), (["--resume"], "nothing to resume")):
        proc = run_cli(*_distill_args(cli_files, out, *extra))
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case,message", [
    ("vocab", "vocabularies differ"),
    ("othertok", "tokenizer differs"),
    ("zero", "token budget must be positive"),
    ("empty-resume", "nothing to resume"),
    ("liger", "--loss-kernel liger needs a CUDA GPU"),
])
@pytest.mark.cli
def test_cli_bad_inputs_exit_2_with_one_line(cli_files, case, message):
    f = dict(cli_files)
    out = f["root"] / f"bad-{case}"
    extra = []
    if case in ("vocab", "othertok"):
        f["student"] = f[case]
    elif case == "zero":
        extra = ["--tokens", "0"]
    elif case == "liger":
        extra = ["--loss-kernel", "liger", "--device", "cpu"]
    else:
        extra = ["--resume"]
    proc = run_cli(*_distill_args(f, out, *extra))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.cli
@pytest.mark.slow
def test_two_process_ddp_on_cpu_equals_one_process_with_gradient_accumulation(cli_files, tmp_path):
    """The README's way to scale, run here on two CPU processes (gloo): the repository's DDP config
    with --num_processes 2. Two processes of batch 2 see the same blocks per step as one process of
    batch 2 x grad-accum 2, and DDP's mean of two gradients equals accumulation's sum of halves bit
    for bit (halving is exact), so the weights must be equal, not merely close."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = _distill_args(cli_files, one, "--batch", "2", "--grad-accum", "2", "--eval-tokens", "0")
    single = run_cli(*args)
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(ROOT / "configs" / "accelerate_ddp.yaml"), "--num_processes", "2",
              "--mixed_precision", "no", "--main_process_port", str(_free_port()), "-m", "compact",
              *_distill_args(cli_files, two, "--batch", "2", "--eval-tokens", "0")]
    double = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-2000:]
    result = json.loads(double.stdout.strip().splitlines()[-1])
    assert result["processes"] == 2 and result["steps"] == json.loads(single.stdout.splitlines()[-1])["steps"]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_compiled_runs_equal_the_eager_one(tmp_path, pair, tokenizer):
    """--compile layers and --compile model run the student and the teacher through torch.compile
    (inductor, here on the CPU): the same losses and weights as the eager run up to float
    rounding, the same checkpoint keys, and the models given to the run left uncompiled."""
    from torch._dynamo.utils import counters

    if distill.compile_problem(torch.device("cpu")):
        pytest.skip(distill.compile_problem(torch.device("cpu")))
    teacher, student, data = pair
    plain = _with_dropout(copy.deepcopy(student), 0.0)  # inductor draws dropout from its own RNG
    runs = {}
    for mode in ("off", "layers", "model"):
        torch._dynamo.reset()
        counters.clear()
        loaded, t_loaded = _loaded(copy.deepcopy(plain), tokenizer, "tiny-student"), \
            _loaded(teacher, tokenizer, "tiny-teacher")
        out = tmp_path / f"compile-{mode}"
        distill.run(_config((teacher, plain, data), out, compile=mode, hidden_weight=0.0, eval_tokens=0),
                    teacher=t_loaded, student=loaded)
        runs[mode] = (_steps(out), _weights(out))
        # compiled: the student's and the teacher's (one graph per body, or one block graph each)
        assert counters["stats"]["unique_graphs"] >= (0 if mode == "off" else 2)
        for model in (loaded.model, t_loaded.model):  # left as they came
            assert not hasattr(model, "_orig_mod")
            assert all(m._compiled_call_impl is None for m in model.modules())
    eager_steps, eager_w = runs["off"]
    for mode in ("layers", "model"):
        steps, weights = runs[mode]
        for a, b in zip(eager_steps, steps, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["kd"] == pytest.approx(a["kd"], rel=1e-4)
        assert weights.keys() == eager_w.keys()
        assert max((weights[k] - eager_w[k]).abs().max().item() for k in weights) < 1e-4, mode
    for mode in ("layers", "model"):
        with pytest.raises(models.UserError, match="--compile does not combine with --hidden-weight"):
            distill.run(_config(pair, tmp_path / "h", compile=mode), teacher=_loaded(teacher, tokenizer, "t"),
                        student=_loaded(copy.deepcopy(plain), tokenizer, "s"))
