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

Early stop of looping responses (``generate(..., stop_on_repetition=(n, min_repeats))``, the HF
backend's rule): the engine is started with the logits processor of `.vllm_repetition_stop`, which
forces the end-of-sequence token on a request right after its newest token completed the
``min_repeats``-th occurrence of an n-gram, so vLLM stops decoding it. The rollout is then made
exactly as the HF backend makes it: the stops are found again from the returned tokens
(`repetition_stops`, the same kernel and rule), a stopped response ends at its stopping token (the
forced end-of-sequence token and its log-prob are dropped), is truncated and is flagged in
`Rollout.repetition_stop`. With ``ignore_eos`` a forced end-of-sequence would not end a request,
so the engine is not asked to stop; the responses are cut afterwards (same rollout, no time saved).

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
    ``pad_token_id`` default to the folder's config. ``early_stop`` (default on; not with
    speculative decoding, where vLLM refuses custom logits processors) registers the logits
    processor that ends looping responses in the engine; without it ``stop_on_repetition`` still
    gives the same rollout, cut after decoding.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        sleep: bool | None = None,
        kv_cache_gib: int | None = None,
        early_stop: bool = True,
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
        # Whether the engine has the processor that stops looping requests (`.vllm_repetition_stop`).
        self.engine_early_stop = bool(early_stop) and llm is None and "speculative_config" not in engine_options
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
        if self.engine_early_stop:
            from .vllm_repetition_stop import PATH

            options["logits_processors"] = [*(options.get("logits_processors") or []), PATH]
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
        # A sharded (FSDP) parameter is gathered one at a time as the loader asks for it: the
        # engine's copy is the only full one on the device.
        weights = ((name, _full(p.detach())) for name, p in model.named_parameters(remove_duplicate=False))
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
        stop_on_repetition: tuple[int, int] | None = None,
        first_response: int = 0,
    ) -> Rollout:
        """Sample ``n`` responses per prompt; ``temperature=0`` decodes greedily.
        ``first_response``: the index of this call's first response in a larger rollout split
        across calls (a data-parallel rank's offset): each response's seed follows its index in
        the whole rollout, so the split calls sample what one call would.
        ``stop_on_repetition=(n, k)`` ends a response at the token that completes the k-th
        occurrence of an n-gram in it: truncated, flagged in `Rollout.repetition_stop` (as the
        HF backend does; module docstring)."""
        check_generate_args(prompts, n, max_new_tokens)
        if stop_on_repetition is not None and (stop_on_repetition[0] < 1 or stop_on_repetition[1] < 2):
            raise ValueError(f"stop_on_repetition: expected (n >= 1, min_repeats >= 2), got {stop_on_repetition}")
        from vllm import SamplingParams

        greedy = temperature == 0
        expanded = [list(p) for p in prompts for _ in range(n)]
        index = torch.arange(len(prompts)).repeat_interleave(n)
        extra = None
        if stop_on_repetition is not None and self.engine_early_stop and not ignore_eos:
            from .vllm_repetition_stop import EXTRA_ARG

            extra = {EXTRA_ARG: [int(stop_on_repetition[0]), int(stop_on_repetition[1]), int(self.eos_token_id)]}
        # One request per response, each with its own seed derived from ``seed``: the same
        # seed gives the same rollout, and row order is explicit.
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0 if greedy else -1,
                max_tokens=max_new_tokens,
                seed=None if seed is None or greedy else seed * 1_000_003 + first_response + row,
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=[] if ignore_eos else [self.eos_token_id],
                ignore_eos=ignore_eos,
                detokenize=False,
                extra_args=extra,
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
        cut = [0] * len(rows)
        if stop_on_repetition is not None:
            cut = repetition_stops(rows, stop_on_repetition[0], stop_on_repetition[1], self.eos_token_id, ignore_eos)
        ends = []  # (length, ended with end-of-sequence)
        for ids, stop in zip(rows, cut):
            if stop:  # at the stopping token; a forced end-of-sequence after it is not the policy's
                ends.append((stop, False))
            elif not ignore_eos and self.eos_token_id in ids:
                ends.append((ids.index(self.eos_token_id) + 1, True))
            else:
                ends.append((len(ids), False))
        steps = max(length for length, _ in ends)
        tokens = torch.full((len(rows), steps), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), steps), dtype=torch.float32)
        lengths = torch.zeros(len(rows), dtype=torch.long)
        truncated = torch.zeros(len(rows), dtype=torch.bool)
        for i, (ids, lp, (length, ended)) in enumerate(zip(rows, logps, ends)):
            tokens[i, :length] = torch.tensor(ids[:length], dtype=torch.long)
            logprobs[i, :length] = torch.tensor(lp[:length], dtype=torch.float32)
            lengths[i] = length
            truncated[i] = not ended
        looped = torch.tensor([stop > 0 for stop in cut]) if stop_on_repetition is not None else None
        return Rollout(expanded, index, tokens, lengths, truncated, logprobs, None, looped)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def repetition_stops(rows: list[list[int]], n: int, min_repeats: int, eos_token_id: int,
                     ignore_eos: bool = False) -> list[int]:
    """Per response (token ids), the length at which ``stop_on_repetition=(n, min_repeats)`` ends
    it -- the position, counted from 1, of the token completing an n-gram's ``min_repeats``-th
    occurrence, not an end-of-sequence token -- or 0 where the rule does not fire before the
    response ends (its end-of-sequence token, unless ``ignore_eos``, or its last token). The HF
    backend's decode loop applies the same rule with the same kernel
    (`longcot.kernels.repetition_update`), one column per call."""
    if not rows:
        return []
    from longcot.kernels import repetition_state, repetition_update

    width = max(len(r) for r in rows)
    stops = torch.zeros(len(rows), dtype=torch.long)
    if width == 0:
        return stops.tolist()
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    state = repetition_state(len(rows), width, n, "cpu")
    done = torch.zeros(len(rows), dtype=torch.bool)
    for t in range(width):
        active = (lengths > t) & ~done
        if not bool(active.any()):
            break
        tok = tokens[:, t]
        occurrences = repetition_update(state, tok, active=active).occurrences
        stop = (occurrences >= min_repeats) & active & (tok != eos_token_id)
        stops = torch.where(stop, t + 1, stops)
        done |= stop
        if not ignore_eos:
            done |= active & (tok == eos_token_id)
    return stops.tolist()


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
