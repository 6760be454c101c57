import contextlib
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("longcot", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("longcot")


@contextlib.contextmanager
def kernels_backend(name: str):
    """Force LONGCOT_KERNELS for the duration of a block."""
    old = os.environ.get("LONGCOT_KERNELS")
    os.environ["LONGCOT_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LONGCOT_KERNELS", None)
        else:
            os.environ["LONGCOT_KERNELS"] = old


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv("LONGCOT_KERNELS", raising=False)
    torch.manual_seed(0)
