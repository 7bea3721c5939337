"""Mode tests run in float64: exactness, not float32 rounding, is under test."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)
