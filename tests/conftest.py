"""Shared fixtures.

The one autouse fixture runs every test single-threaded (the tensors are tiny; on a shared 2-core
machine OpenMP threads contending with another process make them 10-50x slower) and restores the
thread count after. Subprocesses (the pipeline smoke run) choose their own threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup would hang without network

import pytest
import torch

from marflow_core import GaussianMixtureTeacher


@pytest.fixture(autouse=True)
def _single_threaded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def gmm2d() -> GaussianMixtureTeacher:
    """A float64 three-mode 2-D mixture with unequal weights and stds (the exact teacher)."""
    return GaussianMixtureTeacher(
        [0.5, 0.3, 0.2],
        [[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]],
        [0.3, 0.6, 1.0],
        dtype=torch.float64,
    )


@pytest.fixture
def gmm3d() -> GaussianMixtureTeacher:
    """A float64 three-mode 3-D mixture (catches dimension factors that 2-D would hide)."""
    return GaussianMixtureTeacher(
        [0.5, 0.3, 0.2],
        [[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.0, -2.0, -1.0]],
        [0.3, 0.6, 1.0],
        dtype=torch.float64,
    )
