import contextlib
import os

import pytest
import torch
from hypothesis import settings

# Triton runs on CPU tensors only through its interpreter, and the mode is fixed when Triton is
# imported (it jits its standard library then): choose it before anything imports longcot.
# Machines with CUDA run the kernels compiled (tests/test_gpu_logprobs.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture
def triton_interpreter(monkeypatch):
    """LONGCOT_KERNELS=triton on CPU tensors: Triton's interpreter (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from longcot.kernels.logprobs import triton_interpreted

    if not triton_interpreted():
        pytest.skip("Triton runs compiled here (TRITON_INTERPRET is not 1)")
    monkeypatch.setenv("LONGCOT_KERNELS", "triton")


@pytest.fixture
def compiled_triton(monkeypatch):
    """For the GPU modules: compiled Triton on CUDA tensors, whatever LONGCOT_KERNELS says."""
    from longcot.kernels.logprobs import triton_interpreted

    if triton_interpreted():
        pytest.skip("TRITON_INTERPRET=1: these tests are for compiled Triton")
    monkeypatch.delenv("LONGCOT_KERNELS", raising=False)  # auto: Triton for CUDA tensors
    yield
    torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in tiny model (1 layer, hidden 64) saved as a Hugging Face folder."""
    from longcot.engine.data import addition
    from longcot.engine.models import build_char_tokenizer, build_tiny_model, save_model

    tokenizer = build_char_tokenizer(addition.CHARSET)
    model = build_tiny_model(tokenizer, layers=1, hidden=64, heads=1)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")
