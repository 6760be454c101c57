"""Builds the C++ CPU kernels `longcot.kernels._cpu` (everything else is in pyproject.toml)."""

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

compile_args = ["-O3", "-fvisibility=hidden"]
link_args: list[str] = []
if sys.platform.startswith("linux"):
    compile_args.append("-pthread")
    link_args.append("-pthread")

setup(
    ext_modules=[
        Pybind11Extension(
            "longcot.kernels._cpu",
            sources=["csrc/bindings.cpp", "csrc/ngram.cpp", "csrc/ngram_update.cpp", "csrc/scans.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
