"""Fixtures: SmolLM2's real tokenizer, tiny random-weight models of every family built from it,
and saved tiny checkpoints; plus the hook that skips `cuda` tests on a machine without CUDA.

Plain helpers live in tests/helpers.py; nothing imports this file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from compact import hardware, models
from tests.helpers import tiny_model

# The runs store is per user and outlives the suite: a store left by another compact (an older or
# newer schema) must not decide a test, and tests must not write into the user's history. Set
# before any test runs, so CLI and server subprocesses inherit it; model caches stay shared.
os.environ["COMPACT_RUNS_DB"] = str(Path(tempfile.mkdtemp(prefix="compact-tests-")) / "runs.sqlite")


def pytest_configure(config):
    # xdist runs a test process per core (make test: -n 2 on CI's two cores), and each of them, with
    # the servers and CLIs it starts, would otherwise give torch's OpenMP pool every core: the pools
    # then spin against each other (the suite took 17 min instead of 12). Set once in the main
    # process, before the workers start, so they and their subprocesses inherit it; an
    # OMP_NUM_THREADS the user set wins.
    if not hasattr(config, "workerinput"):
        workers = config.getoption("numprocesses", None)  # an int, "auto" or None
        workers = workers if isinstance(workers, int) else hardware.cores() if workers else 1
        os.environ.setdefault("OMP_NUM_THREADS", str(hardware.cpu_threads(workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer, from the cached default checkpoint."""
    tok = AutoTokenizer.from_pretrained(models._default_folder())
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="session")
def make_model(tokenizer):
    def make(family: str, seed: int = 0, **shape):
        return tiny_model(family, len(tokenizer), seed, **shape)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, make_model, tokenizer):
    """A saved tiny checkpoint per family: folder path."""
    cache = {}

    def make(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            models.save(make_model(family), tokenizer, out, {"source": "test"})
            cache[family] = out
        return cache[family]

    return make
