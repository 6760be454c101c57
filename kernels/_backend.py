"""Which implementation of an op runs: the PyTorch reference, the C++ extension or Triton.

`LONGCOT_KERNELS` overrides the choice for every op:

- unset or ``auto``: Triton for CUDA tensors, the CPU path (C++ or chunked PyTorch) for CPU
  tensors, each where the op has one, else the reference;
- ``reference``: the plain PyTorch references (for debugging and the benchmarks' baselines);
- ``cpu``: the CPU path where the op has one: the C++ extension (tensors make a round trip
  through host memory), or for the log-prob ops chunked PyTorch (runs on the tensors' device);
- ``triton``: the Triton kernels where the op has one; with ``TRITON_INTERPRET=1`` they run on CPU
  tensors through Triton's interpreter.
"""

from __future__ import annotations

import os
from collections import Counter
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "cpu", "triton")
ENV_VAR = "LONGCOT_KERNELS"

# (op, implementation) -> calls, for tests and reports that must know which path ran (e.g. that a
# training step on CUDA tensors reached the Triton kernels).
_dispatch_counts: Counter[tuple[str, str]] = Counter()

_cpu_module: ModuleType | None = None
_cpu_error: Exception | None = None


def requested_backend() -> str:
    """The backend named by ``LONGCOT_KERNELS`` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}: expected one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def cpu_extension() -> ModuleType:
    """The compiled C++ module ``longcot.kernels._cpu``; ImportError with the fix if not built."""
    global _cpu_module, _cpu_error
    if _cpu_module is None and _cpu_error is None:
        try:
            from longcot.kernels import _cpu

            _cpu_module = _cpu
        except ImportError as exc:  # not built: reported when it is actually needed
            _cpu_error = exc
    if _cpu_module is None:
        raise ImportError(
            "longcot.kernels._cpu (the C++ kernels) is not built; run `pip install -e .` "
            f"in the repository (or `make test`). Cause: {_cpu_error}"
        )
    return _cpu_module


def has_cpu_extension() -> bool:
    try:
        cpu_extension()
    except ImportError:
        return False
    return True


def cpu_threads() -> int:
    """Threads the C++ kernels may use: the same budget torch's intra-op pool has."""
    return max(1, torch.get_num_threads())


def dispatch_counts() -> dict[tuple[str, str], int]:
    """Calls per (op, implementation) since the last ``reset_dispatch_counts()``."""
    return dict(_dispatch_counts)


def reset_dispatch_counts() -> None:
    _dispatch_counts.clear()


def select(
    device: torch.device, *, cpu: bool, triton: bool, cpu_needs_extension: bool = True, op: str = "?"
) -> str:
    """Pick ``reference``, ``cpu`` or ``triton`` for an op with the given implementations, and
    count the choice under ``op``.

    ``cpu_needs_extension=False`` is for ops whose CPU path is plain PyTorch (chunked log-probs):
    it runs without the C++ extension, on any device.
    """
    impl = _select(device, cpu=cpu, triton=triton, cpu_needs_extension=cpu_needs_extension)
    _dispatch_counts[(op, impl)] += 1
    return impl


def _select(device: torch.device, *, cpu: bool, triton: bool, cpu_needs_extension: bool) -> str:
    want = requested_backend()
    if want == "reference":
        return "reference"
    if want == "cpu":
        if cpu:
            if cpu_needs_extension:
                cpu_extension()  # an explicit request for C++ kernels fails loudly when missing
            return "cpu"
        return "reference"
    if want == "triton":
        return "triton" if triton else "reference"
    if device.type == "cuda" and triton:
        return "triton"
    if device.type == "cpu" and cpu and (not cpu_needs_extension or has_cpu_extension()):
        return "cpu"
    return "reference"
