"""The `longcot` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _bench(args: argparse.Namespace) -> int:
    if args.suite == "kernels":
        from longcot.bench import kernels

        return kernels.run(device=args.device, small=args.small, json_path=args.json)
    if args.suite == "step":
        from longcot.bench import step

        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
        return step.run(device=args.device, small=args.small, json_path=args.json, lengths=lengths,
                        batch=args.batch, budget=args.budget, threads=args.threads)
    if args.suite == "compile":
        from longcot.bench import compile as compile_bench

        if args.device != "cpu":
            raise SystemExit("longcot bench compile: compiles for GPU targets without one (no --device)")
        return compile_bench.run(small=args.small, json_path=args.json)
    if args.suite == "rollout":
        from longcot.bench import early_stop

        if args.device != "cpu":
            raise SystemExit("longcot bench rollout: runs on the CPU only for now (--device cpu)")
        return early_stop.run(small=args.small, json_path=args.json, repeats=args.repeats, threads=args.threads)
    if args.suite == "peers":
        from longcot.bench import peers

        if args.device != "cpu":
            raise SystemExit("longcot bench peers: runs on the CPU only (--device cpu)")
        return peers.run(small=args.small, json_path=args.json, steps=args.steps, seed=args.seed,
                         threads=args.threads, repeats=args.repeats)
    raise AssertionError(args.suite)  # argparse restricts the choices


def _replicate(args: argparse.Namespace) -> int:
    from longcot.bench import paper_s4

    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1 or args.jobs < 1:
        raise SystemExit("longcot replicate: --seeds and --jobs must be >= 1")
    return paper_s4.run(seeds=seeds, quick=args.quick, out=args.out, jobs=args.jobs)


def _load(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.overrides)


def _train(args: argparse.Namespace) -> int:
    config = _load(args)  # config errors before the heavy imports
    if config.distributed.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        config.check_world(config.distributed.nproc_per_node)  # before any process starts

        argv = ["train", *(["--config", args.config] if args.config else []), *args.overrides]
        return launch(config.distributed.nproc_per_node, argv)
    from .trainer import Trainer

    Trainer(config).fit()
    return 0


def _sft(args: argparse.Namespace) -> int:
    config = _load(args)
    from .sft import sft_main

    sft_main(config)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import load_eval_config, run_eval

    # --samples goes through the overrides, so a bad K is reported like any other bad value.
    samples = [f"samples={args.samples}"] if args.samples is not None else []
    config = load_eval_config(samples + list(args.overrides))
    run_eval(args.model, args.data, config, args.out)
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

    evaluate = commands.add_parser(
        "eval", help="pass@1 on MATH-500, AIME 2024 or a JSONL/Parquet file",
        description="Samples K responses per problem (the paper's temperature 0.7, top-p 0.95, up to "
                    "16,384 new tokens), scores them with the training verifier, prints a table and "
                    "writes samples.jsonl and eval_summary.json.",
    )
    evaluate.add_argument("--model", required=True, metavar="DIR", help="a local Hugging Face model folder")
    evaluate.add_argument(
        "--data", required=True, metavar="NAME_OR_PATH",
        help="math500, aime24 (packaged), or a .jsonl/.parquet file with problem/answer fields",
    )
    evaluate.add_argument("--samples", metavar="K", default=None, help="samples per problem (default 1)")
    evaluate.add_argument("--out", metavar="DIR", default=None,
                          help="output folder (default: runs/eval-<time>-<data>)")
    evaluate.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="e.g. temperature=0.6 max_new_tokens=4096 limit=50 backend=vllm (see EvalConfig)",
    )
    evaluate.set_defaults(func=_eval)

    replicate = commands.add_parser(
        "replicate", help="reproduce a paper experiment on the built-in reflection task",
        description="s4: section 4 of Yeo et al. (2025), the reward's effect on length -- classic vs cosine "
                    "reward at a tight budget, the repetition penalty at a long one, its gamma -- every arm of "
                    "examples/paper_s4/ from one SFT policy per seed; writes summary.json, table.md and figures.",
    )
    replicate.add_argument("experiment", choices=["s4"])
    replicate.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    replicate.add_argument("--quick", action="store_true", help="two RL steps of each arm: a smoke run")
    replicate.add_argument("--out", metavar="DIR", default=None,
                           help="output folder (default bench/out/paper_s4, --quick: bench/out/paper_s4-quick); "
                                "finished runs in it are reused")
    replicate.add_argument("--jobs", type=int, default=2, help="runs at a time, the cores split between them (default 2)")
    replicate.set_defaults(func=_replicate)

    bench = commands.add_parser("bench", help="run a benchmark suite and write its JSON")
    bench.add_argument("suite", choices=["kernels", "step", "peers", "compile", "rollout"],
                       help="kernels: per-op microbenchmarks; step: experience + PPO update at long lengths, "
                            "padded vs token-budget micro-batches, with and without checkpointing; peers: "
                            "longcot's GRPO against TRL's GRPOTrainer on the built-in task, same settings; "
                            "compile: every Triton launch variant compiled for sm_80, sm_89 and sm_90 without "
                            "a GPU (registers, spills, shared memory, occupancy); rollout: rollout time with and "
                            "without the early stop of looping responses, on a policy that loops on half its prompts")
    bench.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="device to measure on (cuda --small runs without a GPU under TRITON_INTERPRET=1)",
    )
    bench.add_argument("--small", action="store_true", help="small shapes: a quick smoke run")
    bench.add_argument(
        "--json", metavar="PATH", default=None,
        help="where to write the results (default: bench/out/<suite>-<device>.json; compile: bench/out/compile.json)",
    )
    bench.add_argument("--lengths", metavar="L,L,...", default=None,
                       help="step: maximum response lengths (default 2048,8192,16384)")
    bench.add_argument("--batch", type=int, default=None,
                       help="step: responses per row (default 16; 2 at L = 16,384 on CPU)")
    bench.add_argument("--budget", type=int, default=16384, help="step: tokens per micro-batch (default 16384)")
    bench.add_argument("--threads", type=int, default=2, help="step, peers, rollout: torch threads per side (default 2)")
    bench.add_argument("--steps", type=int, default=None, help="peers: RL steps per side (default 60; --small: 3)")
    bench.add_argument("--repeats", type=int, default=None,
                       help="peers: runs of each side, alternating (default 2; --small: 1); rollout: runs with and without the early stop (default 3)")
    bench.add_argument("--seed", type=int, default=0,
                       help="peers: seed of the task split, the SFT warm start and both sides (default 0)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so in
    # `eval ... limit=20 --samples 2 seed=1` the trailing overrides come back unparsed.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
