"""Fixtures of the Triton kernel test modules, loaded for every test by conftest.py;
a module opts into ``triton_backend`` with ``pytestmark = pytest.mark.usefixtures("triton_backend")``."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()


@pytest.fixture
def triton_backend(monkeypatch):
    """Every op takes its Triton path; on the CPU, in Triton's interpreter."""
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh inputs every run; a failing test prints the seed that replays them."""
    seed = int(os.environ.get("EMBER_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"inputs from seed {seed}: EMBER_TEST_SEED={seed} replays them")
    return torch.Generator().manual_seed(seed)
