"""Rollout speed: Hugging Face `generate` against `VLLMGenerator`, same work, one process.

Both sides sample the same prompts at temperature 0.7 for a fixed number of new tokens
(end-of-sequence ignored), at two sizes: the default preset's model (4 layers, hidden 128) at
the default run's lengths (16 prompts x 8 samples, 128 new tokens), and a long-generation
setting (4 layers, hidden 256, 64 prompts x 512 new tokens). vLLM is started before either side
is timed: starting it binds the process's OpenMP threads, which speeds up torch work too, so
both sides run on the same side of that start. Also times `update_weights` (the in-place weight
sync after every PPO step).

    python -m longcot.bench.rollout [--small] [--out FILE]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {
    "default": {"layers": 4, "hidden": 128, "heads": 2, "prompts": 16, "n": 8, "new_tokens": 128},
    "long": {"layers": 4, "hidden": 256, "heads": 4, "prompts": 64, "n": 1, "new_tokens": 512},
}


def _hf_tokens_per_s(model, prompts, n, new_tokens, pad_id) -> float:
    from .rollout_loop import _left_padded

    ids, attn = _left_padded([p for p in prompts for _ in range(n)], pad_id)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=0.7, top_p=1.0,
                             top_k=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    seconds = time.perf_counter() - t
    assert out.sequences.shape[1] - ids.shape[1] == new_tokens
    return ids.shape[0] * new_tokens / seconds


def run(small: bool, only: str | None = None) -> list[dict]:
    from longcot.engine.data import CHARSET
    from longcot.engine.models import build_char_tokenizer, build_tiny_model, save_model
    from longcot.engine.rollout import VLLMGenerator

    tok = build_char_tokenizer(CHARSET)
    prompts_text = [f"{a}+{b}=" for a, b in zip(range(100, 999, 7), range(999, 100, -11))]
    rows = []
    for name, s in SETTINGS.items():
        if only is not None and name != only:
            continue
        if small:
            s = {**s, "prompts": 4, "new_tokens": 32}
        model = build_tiny_model(tok, layers=s["layers"], hidden=s["hidden"], heads=s["heads"],
                                 max_positions=s["new_tokens"] + 32).eval()
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts_text[: s["prompts"]]]
        with tempfile.TemporaryDirectory() as tmp:
            path = save_model(model, tok, Path(tmp) / "m")
            t = time.perf_counter()
            gen = VLLMGenerator(path, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                kv_cache_gib=1, max_num_seqs=256)
            start_s = time.perf_counter() - t
        work = len(prompts) * s["n"] * s["new_tokens"]
        gen.generate(prompts[:2], 1, 0.7, 1.0, 8, seed=0, ignore_eos=True)  # warm-up
        _hf_tokens_per_s(model, prompts[:2], 1, 8, tok.pad_token_id)
        hf = _hf_tokens_per_s(model, prompts, s["n"], s["new_tokens"], tok.pad_token_id)
        t = time.perf_counter()
        r = gen.generate(prompts, s["n"], 0.7, 1.0, s["new_tokens"], seed=0, ignore_eos=True)
        vl = work / (time.perf_counter() - t)
        assert int(r.lengths.sum()) == work
        updates = []
        for _ in range(5):
            t = time.perf_counter()
            gen.update_weights(model)
            updates.append(time.perf_counter() - t)
        gen.close()
        rows.append({"setting": name, **s, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                     "hf_tokens_per_s": hf, "vllm_tokens_per_s": vl, "speedup": vl / hf,
                     "vllm_start_s": start_s, "update_weights_ms": 1e3 * sorted(updates)[len(updates) // 2]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick smoke run")
    parser.add_argument("--out", default="bench/out/rollout.json")
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.setting is not None:  # one setting, in this fresh process
        Path(args.out).write_text(json.dumps(run(args.small, args.setting)))
        return 0
    # Each setting in a fresh process: a second vLLM engine in one process re-binds the OpenMP
    # threads and slowed the torch side down by an order of magnitude here.
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SETTINGS:
            part = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "longcot.bench.rollout", "--setting", name, "--out", str(part)]
            subprocess.run(cmd + (["--small"] if args.small else []), check=True)
            rows += json.loads(part.read_text())
    print(f"{'setting':<8} {'params':>7} {'work':>16} {'HF tok/s':>9} {'vLLM tok/s':>10} {'speedup':>7} "
          f"{'update ms':>9}")
    for r in rows:
        work = f"{r['prompts'] * r['n']}x{r['new_tokens']}"
        print(f"{r['setting']:<8} {r['params_m']:>6.2f}M {work:>16} {r['hf_tokens_per_s']:>9.0f} "
              f"{r['vllm_tokens_per_s']:>10.0f} {r['speedup']:>6.2f}x {r['update_weights_ms']:>9.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
