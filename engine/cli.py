"""The `longcot` command line."""

from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
    if args.suite == "kernels":
        from longcot.bench import kernels

        return kernels.run(device=args.device, small=args.small, json_path=args.json)
    raise AssertionError(args.suite)  # argparse restricts the choices


def _load(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.overrides)


def _train(args: argparse.Namespace) -> int:
    config = _load(args)  # config errors before the heavy imports
    from .trainer import Trainer

    Trainer(config).fit()
    return 0


def _sft(args: argparse.Namespace) -> int:
    config = _load(args)
    from .sft import sft_main

    sft_main(config)
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", default=None, help="a YAML config (default: the built-in job)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied last")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcot",
        description="Kernel-accelerated RL for long chain-of-thought reasoning.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="SFT warm start, then RL (PPO by default) with the paper's rewards",
        description="Runs the configured job; with no arguments, the built-in addition task on a "
                    "tiny model (a few minutes on a laptop CPU).",
    )
    _add_config_args(train)
    train.set_defaults(func=_train)

    sft = commands.add_parser("sft", help="supervised fine-tuning only (prompt/response data)")
    _add_config_args(sft)
    sft.set_defaults(func=_sft)

    bench = commands.add_parser("bench", help="run a benchmark suite and write its JSON")
    bench.add_argument("suite", choices=["kernels"], help="kernels: per-op microbenchmarks")
    bench.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="device to measure on (cuda --small runs without a GPU under TRITON_INTERPRET=1)",
    )
    bench.add_argument("--small", action="store_true", help="small shapes: a quick smoke run")
    bench.add_argument(
        "--json", metavar="PATH", default=None,
        help="where to write the results (default: bench/out/kernels-<device>.json)",
    )
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError, TrainingHalted
    from .config import ConfigError
    from .data.datasets import DataError
    from .models import ModelError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, CheckpointError) as exc:
        # Bad input: one line naming the key, file or path, exit 2, no traceback.
        print(f"longcot: error: {exc}", file=sys.stderr)
        return 2
    except TrainingHalted as exc:
        # Not bad input: the run itself failed (and left a checkpoint); exit 1.
        print(f"longcot: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
