"""The `longcot` command line."""

from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
    if args.suite == "kernels":
        from longcot.bench import kernels

        return kernels.run(device=args.device, small=args.small, json_path=args.json)
    raise AssertionError(args.suite)  # argparse restricts the choices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcot",
        description="Kernel-accelerated RL for long chain-of-thought reasoning.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = commands.add_parser("bench", help="run a benchmark suite and write its JSON")
    bench.add_argument("suite", choices=["kernels"], help="kernels: per-op microbenchmarks")
    bench.add_argument("--device", choices=["cpu"], default="cpu", help="device to measure on")
    bench.add_argument("--small", action="store_true", help="small shapes: a quick smoke run")
    bench.add_argument(
        "--json", metavar="PATH", default=None,
        help="where to write the results (default: bench/out/kernels-<device>.json)",
    )
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
