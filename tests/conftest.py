"""Fixtures shared by the training tests (trainer, engines, streamed data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kalm_lib.model import EmbeddingModel


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread per test process: the multi-process tests already fill the 2 cores, and a tiny model gains
    nothing from more. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny random-init Qwen2 EmbeddingModel folder (seed 0, max length 64)."""
    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    EmbeddingModel.tiny_decoder("qwen2", seed=0, max_length=64).save(path)
    return path
