"""Client tests: one torch thread, and the warnings DP-SGD runs expect silenced."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_one_thread() -> Iterator[None]:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus hooks
        warnings.filterwarnings("ignore", message="Optimal order is the")  # tiny sigma's RDP
        yield
