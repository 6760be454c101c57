"""Rollouts with vLLM running in the trainer's own process, weights shared in place.

One engine per generator, started once from a model folder and reused across steps. After
every trainer update, ``update_weights(model)`` streams the module's current parameters (the
trainer's own tensors, no copy on disk) into the running engine through the model runner's
``reload_weights(weights_iterator=..., is_checkpoint_format=True)`` -- which also handles the
CPU build's repacked linear weights, where ``model.load_weights`` fails -- and clears the
prefix cache so no KV computed with the old weights is reused.

Log-probs. The engine is started with ``logprobs_mode="processed_logprobs"``: vLLM then
reports log-softmax of the logits after temperature (and after top-k/top-p, renormalised over
the kept tokens). With ``top_p = 1`` that is exactly the trainer's definition, log-softmax(logits
/ temperature) of the sampled token; greedy requests (temperature 0) get log-softmax of the raw
logits, as the Hugging Face backend reports them. With ``top_p < 1`` vLLM's numbers are the
truncated, renormalised distribution's (larger than the trainer's by -log of the kept mass);
the trainer recomputes the old policy's log-probs itself, so training does not depend on them.
vLLM's default, ``raw_logprobs``, is log-softmax before temperature and is not what we want.

On a GPU, ``sleep=True`` (the default there) starts the engine with ``enable_sleep_mode`` and
puts it to sleep (level 1: weights offloaded, KV cache freed) after each ``generate``, so the
KV cache does not sit in GPU memory while the trainer updates; ``update_weights`` wakes the
weights only, loads the new ones, and the next ``generate`` wakes the KV cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .base import Rollout, check_generate_args


class VLLMGenerator:
    """The `Generator` protocol on an in-process vLLM engine built from ``model_path``.

    ``engine_options`` go to ``vllm.LLM`` (e.g. ``dtype``, ``gpu_memory_utilization``,
    ``max_model_len``, ``kv_cache_gib`` -- the CPU build's KV-cache size, exported as
    ``VLLM_CPU_KVCACHE_SPACE``). ``sleep`` (default: on when CUDA is available) enables the
    GPU sleep/wake cycle described in the module docstring. ``eos_token_id`` and
    ``pad_token_id`` default to the folder's config.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        sleep: bool | None = None,
        kv_cache_gib: int | None = None,
        llm: Any = None,
        **engine_options: Any,
    ):
        self.model_path = str(model_path)
        cfg = _read_config(self.model_path)
        self.eos_token_id = eos_token_id if eos_token_id is not None else _first(cfg.get("eos_token_id"))
        if self.eos_token_id is None:
            raise ValueError(f"{model_path}: no eos_token_id in config.json; pass eos_token_id")
        pad = pad_token_id if pad_token_id is not None else _first(cfg.get("pad_token_id"))
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.sleep_enabled = torch.cuda.is_available() if sleep is None else bool(sleep)
        self._kv_asleep = False
        self._weights_asleep = False
        self._prefix_stale = False
        if llm is not None:  # an engine (or a stand-in) built elsewhere
            self.llm = llm
            return
        # The engine must live in this process: its model is then reachable in place.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if kv_cache_gib is not None:
            if isinstance(kv_cache_gib, bool) or int(kv_cache_gib) != kv_cache_gib or kv_cache_gib < 1:
                raise ValueError(f"kv_cache_gib: expected a whole number of GiB >= 1, got {kv_cache_gib!r}")
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
        from vllm import LLM

        options: dict[str, Any] = {
            "dtype": "float32",
            "enforce_eager": True,
            "seed": 0,
            "max_model_len": cfg.get("max_position_embeddings"),
        }
        options.update(engine_options)
        options["logprobs_mode"] = "processed_logprobs"  # see the module docstring
        options.setdefault("skip_tokenizer_init", True)  # token ids in, token ids out
        if self.sleep_enabled:
            options["enable_sleep_mode"] = True
        if options["max_model_len"] is None:
            del options["max_model_len"]
        self.llm = LLM(model=self.model_path, **options)

    def close(self) -> None:
        """Shut the engine down (the generator is unusable afterwards)."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    # --- the engine in place -----------------------------------------------------------------

    def model_runner(self):
        """The in-process model runner: engine core -> model executor -> driver worker."""
        core = self.llm.llm_engine.engine_core
        core = getattr(core, "engine_core", core)  # InprocClient wraps the EngineCore
        return core.model_executor.driver_worker.worker.model_runner

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current parameters into the running engine, in place."""
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        # Hugging Face names (checkpoint format). Tied weights are listed under both names: the
        # CPU build keeps the LM head as its own (repacked) layer, which reloads only when its
        # own name comes. The tensors are the trainer's own; the loader copies them into the
        # engine's (possibly repacked) parameters.
        weights = ((name, p.detach()) for name, p in model.named_parameters(remove_duplicate=False))
        self.model_runner().reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        if self._kv_asleep:
            self._prefix_stale = True  # the KV cache is freed; reset once it is back
        else:
            self.llm.reset_prefix_cache()

    def _wake(self) -> None:
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        if self._kv_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False
        if self._prefix_stale:
            self.llm.reset_prefix_cache()
            self._prefix_stale = False

    def _sleep(self) -> None:
        self.llm.sleep(level=1)
        self._kv_asleep = self._weights_asleep = True

    # --- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> Rollout:
        check_generate_args(prompts, n, max_new_tokens)
        from vllm import SamplingParams

        greedy = temperature == 0
        expanded = [list(p) for p in prompts for _ in range(n)]
        index = torch.arange(len(prompts)).repeat_interleave(n)
        # One request per response, each with its own seed derived from ``seed``: the same
        # seed gives the same rollout, and row order is explicit.
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0 if greedy else -1,
                max_tokens=max_new_tokens,
                seed=None if seed is None or greedy else seed * 1_000_003 + row,
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=[] if ignore_eos else [self.eos_token_id],
                ignore_eos=ignore_eos,
                detokenize=False,
            )
            for row in range(len(expanded))
        ]
        self._wake()
        try:
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in expanded], params, use_tqdm=False)
        finally:
            if self.sleep_enabled:
                self._sleep()
        rows, logps = [], []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            rows.append(ids)
            logps.append([_chosen_logprob(entry, tok) for entry, tok in zip(c.logprobs or [], ids)])
        steps = max(len(r) for r in rows)
        tokens = torch.full((len(rows), steps), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), steps), dtype=torch.float32)
        lengths = torch.zeros(len(rows), dtype=torch.long)
        truncated = torch.zeros(len(rows), dtype=torch.bool)
        for i, (ids, lp) in enumerate(zip(rows, logps)):
            ended = (not ignore_eos) and self.eos_token_id in ids
            if ended:
                ids = ids[: ids.index(self.eos_token_id) + 1]
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, : len(ids)] = torch.tensor(lp[: len(ids)], dtype=torch.float32)
            lengths[i] = len(ids)
            truncated[i] = not ended
        return Rollout(expanded, index, tokens, lengths, truncated, logprobs)


def _chosen_logprob(entry: Any, token: int) -> float:
    lp = entry[token]
    return float(getattr(lp, "logprob", lp))


def _first(value: Any) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _read_config(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):
        f = Path(path) / name
        if f.is_file():
            for k, v in json.loads(f.read_text()).items():
                if name == "config.json" or v is not None:
                    out[k] = v
    return out
