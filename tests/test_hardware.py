"""Precision, 2:4 kernels and CPU threads by hardware: each case with made-up device properties,
on a CPU."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compact import hardware, models, sparsity
from compact.errors import UserError
from compact.hardware import Device

CPU = Device(False)
T4 = Device(True, (7, 5), "Tesla T4")
V100 = Device(True, (7, 0), "Tesla V100-SXM2-16GB")
A100 = Device(True, (8, 0), "NVIDIA A100-SXM4-40GB")
H100 = Device(True, (9, 0), "NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("dev, dtype, mixed", [
    (CPU, torch.float32, "no"),
    (V100, torch.float16, "fp16"),  # fp16 trains with accelerate's loss scaling
    (T4, torch.float16, "fp16"),
    (A100, torch.bfloat16, "bf16"),
    (H100, torch.bfloat16, "bf16"),
])
def test_precision_follows_the_compute_capability(dev, dtype, mixed):
    assert hardware.compute_dtype(dev) == dtype
    assert hardware.mixed_precision(hardware.compute_dtype(dev)) == mixed


@pytest.mark.parametrize("dev, ok, reason", [
    (CPU, False, "need a CUDA GPU"),
    (T4, False, "Tesla T4 has 7.5"),
    (V100, False, "has 7.0"),
    (A100, True, ""),
    (H100, True, ""),
])
def test_sparse_kernels_need_ampere_and_say_why_not(dev, ok, reason):
    got, why = hardware.sparse_kernels(dev)
    assert got is ok
    assert reason in why and (why == "") is ok


def test_summary_names_device_precision_and_kernels():
    assert hardware.summary(T4).startswith("Tesla T4 (compute capability 7.5): float16")
    assert "2:4 sparse kernels need compute capability 8.0" in hardware.summary(T4)
    assert hardware.summary(H100).endswith("bfloat16; 2:4 sparse kernels available")
    assert hardware.summary(CPU).startswith("cpu: float32")


def test_this_machines_cpu_and_the_dtype_option():
    assert hardware.props("cpu") == CPU
    assert models.pick_dtype(torch.device("cpu")) == torch.float32
    assert models.pick_dtype(torch.device("cpu"), "auto") == torch.float32
    assert models.pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(UserError, match="use auto, float32"):
        models.pick_dtype(torch.device("cpu"), "float8")


def test_semi_structured_on_cpu_gives_the_reason(make_model):
    model = make_model("llama")
    sparsity.one_shot(model, "magnitude")
    with pytest.raises(UserError, match="need a CUDA GPU"):
        sparsity.to_semi_structured(model)


def test_app_sizes_are_small_on_a_cpu_and_the_command_lines_on_a_gpu():
    from compact import experiments, importance, sparsify, train
    from compact.options import default

    cpu, gpu = hardware.app_sizes(CPU), hardware.app_sizes(H100)
    assert set(cpu) == set(gpu) and all(cpu[k] <= gpu[k] for k in cpu)
    # the CPU sizes: each default click answers in about a minute
    assert (cpu["importance_samples"], cpu["importance_seq_len"], cpu["train_tokens"]) == (8, 128, 4096)
    assert cpu["train_tokens"] // (cpu["train_seq_len"] * cpu["train_batch"]) == 8  # steps on the loss curve
    # on a GPU the app starts where the command line does
    assert gpu["train_tokens"] == default(train.TrainingOptions, "tokens")
    assert gpu["train_seq_len"] == default(train.TrainingOptions, "seq_len")
    assert gpu["train_batch"] == default(train.TrainingOptions, "batch")
    assert gpu["train_batch"] == default(sparsify.SparsifyConfig, "batch")
    assert gpu["importance_seq_len"] == default(importance.ImportanceConfig, "seq_len")
    assert gpu["sparsify_samples"] == default(sparsify.SparsifyConfig, "samples")
    assert gpu["experiment_tokens"] == default(experiments.ExperimentConfig, "tokens")
    assert hardware.app_sizes(T4) == gpu


def test_cpu_threads_share_the_cores(monkeypatch):
    assert 1 <= hardware.cores() <= os.cpu_count()
    monkeypatch.setattr(hardware, "cores", lambda: 16)
    assert [hardware.cpu_threads(n) for n in (0, 1, 2, 3, 16, 64)] == [16, 16, 8, 5, 1, 1]


def test_workers_and_server_threads_share_the_cores_by_how_many_run(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "cores", lambda: 4)
    shares, files = hardware.CoreShares(), [tmp_path / f"job-{i}.threads" for i in range(3)]
    read = lambda: [int(f.read_text()) if f.exists() else None for f in files]  # noqa: E731
    assert shares.join(0, files[0]) == 4 and read() == [4, None, None]
    assert shares.join(1, files[1]) == 2 and read() == [2, 2, None]
    assert shares.join("thread") == 1 and read() == [1, 1, None]  # a thread of the server: no file
    shares.leave("thread")
    assert shares.join(2, files[2]) == 1 and read() == [1, 1, 1]
    shares.leave(1)
    assert read() == [2, 1, 2] and shares.share() == 2  # the one that left keeps its last number
    shares.leave(1)  # twice: nothing changes
    shares.leave(0)
    assert read() == [2, 1, 4] and not list(tmp_path.glob("*.part"))
    fixed = hardware.CoreShares(fixed=3)  # the server was given OMP_NUM_THREADS
    assert fixed.join(0, files[0]) == 3 and fixed.join(1, files[1]) == 3 and fixed.share() == 3


def test_a_computing_thread_takes_its_share_as_it_starts_and_at_each_take(monkeypatch):
    monkeypatch.setattr(hardware, "cores", lambda: 2)
    shares, before, seen = hardware.CoreShares(), torch.get_num_threads(), {}
    try:
        torch.set_num_threads(3)
        with shares.computing():
            seen["alone"] = torch.get_num_threads()
            shares.join("worker", None)  # something else starts
            shares.take()
            seen["beside one"] = torch.get_num_threads()
            shares.leave("worker")
            shares.take()
            seen["alone again"] = torch.get_num_threads()
        assert shares.share() == 2 and seen == {"alone": 2, "beside one": 1, "alone again": 2}
        assert torch.get_num_threads() == 3  # the thread's own count again
    finally:
        torch.set_num_threads(before)


def test_omp_threads_reads_the_first_level(monkeypatch):
    for value, threads in (("3", 3), ("4,2", 4), ("", None), ("abc", None), ("0", None)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert hardware.omp_threads() == threads
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert hardware.omp_threads() is None


def test_a_worker_takes_its_share_when_the_file_changes(tmp_path):
    path, before = tmp_path / "job-1.threads", torch.get_num_threads()
    try:
        assert hardware.take_thread_share(path) is None  # no file: unchanged
        path.write_text(str(before))
        assert hardware.take_thread_share(path) is None and torch.get_num_threads() == before
        other = 2 if before == 1 else 1
        path.write_text(str(other))
        assert hardware.take_thread_share(path) == other and torch.get_num_threads() == other
        path.write_text("")  # unreadable: kept
        assert hardware.take_thread_share(path) is None and torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)


def test_the_worker_env_names_the_threads_file_unless_the_server_was_given_threads(monkeypatch, tmp_path):
    from ui import lanes
    from ui import state as st

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(st, "CORES", hardware.CoreShares())
    with lanes._core_share(7, tmp_path / "job-7.threads") as threads:
        env = lanes.worker_env("s", 7, Path("events.jsonl"), threads)
        assert env["OMP_NUM_THREADS"] == str(hardware.cpu_threads(1)) and env["COMPACT_RUN_ID"] == "7"
        assert env[hardware.THREADS_ENV] == str(threads) and threads.exists()
    assert not threads.exists()  # the worker has ended: its file goes
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(st, "CORES", hardware.CoreShares(fixed=3))
    with lanes._core_share(8, tmp_path / "job-8.threads") as threads:
        env = lanes.worker_env("s", 8, Path("events.jsonl"), threads)
    assert threads is None and env["OMP_NUM_THREADS"] == "3" and hardware.THREADS_ENV not in env


# Training steps of a small MLP with 64 MiB weights: glibc's default maps the optimizer's large
# temporaries afresh each step and faults in about 49k pages (the fewest of five steps); with
# the workers' setting the freed memory is reused, without a fault.
_STEP_FAULTS = """
import resource, torch
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 8192))
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(64, 512)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x).logsumexp(-1).mean().backward(); opt.step(); opt.zero_grad()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(faults() for _ in range(5)))
"""
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(_THP.exists() and "[always]" in _THP.read_text(),
                    reason="transparent huge pages on every mapping: too few faults to tell apart")
def test_workers_keep_freed_memory_instead_of_faulting_it_in_again(monkeypatch, tmp_path):
    from ui import lanes

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)

    def faults(env):
        out = subprocess.run([sys.executable, "-c", _STEP_FAULTS], env={**env, "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = 32 * 2**20 // resource.getpagesize()  # 32 MiB, a part of what a step allocates
    assert faults(dict(os.environ)) > pages  # the default: every step faults its blocks in again
    env = lanes.worker_env("s", 1, tmp_path / "events.jsonl")
    assert env["GLIBC_TUNABLES"] == hardware.KEEP_FREED_MEMORY
    assert faults(env) < pages // 100
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")  # the user's own setting wins
    assert lanes.worker_env("s", 1, tmp_path / "events.jsonl")["GLIBC_TUNABLES"] == "glibc.malloc.check=0"
