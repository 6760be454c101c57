"""Early stop of looping responses inside vLLM: a v1 batch-level logits processor.

`VLLMGenerator` registers `RepetitionStopLogitsProcessor` when it starts the engine (engine
argument ``logits_processors``, by import path). A request opts in through its sampling
parameters, ``extra_args={EXTRA_ARG: [n, min_repeats, eos_token_id]}``; requests without it
(evaluation, other callers) are not touched.

The rule is the HF backend's (`HFGenerator.generate(stop_on_repetition=(n, min_repeats))`): a
response is stopped at the token that completes the ``min_repeats``-th occurrence of an n-gram in
it (an end-of-sequence token never does; counting is over response tokens only). The counting is
`longcot.kernels.repetition_update` (the C++ path on the host, where vLLM keeps the output token
lists): one state row per tracked request, one call per decode step for all of them.

How it stops a request (the contract of vLLM 0.32's `vllm.v1.sample.logits_processor`):

- ``update_state(batch_update)`` runs before every forward pass; a non-None `BatchUpdate` lists
  the requests removed from, added to and moved within the persistent batch (to be processed in
  that order). An added request comes with a reference to its live output token list, which vLLM
  appends to after every step. Here it only maps batch indices to tracked requests.
- ``apply(logits)`` runs inside the sampler on the [num_reqs, vocab] logits, rows in batch-index
  order, before temperature and top-k/top-p (the processor is not argmax-invariant, so greedy
  requests get it too). By then the output lists hold every token sampled so far (with async
  scheduling vLLM fills the last step's placeholders, -1, right before sampling; any left are
  not read). Here the tokens each tracked request gained since the last call go through the
  kernel, and a request whose newest token completed a repeat gets its logits replaced by -inf
  everywhere but 0 at its end-of-sequence id: it samples the end-of-sequence token and vLLM
  finishes it (its stop_token_ids hold that id).

So a stopped request's output is its response up to the stopping token plus that one forced
end-of-sequence token (whose log-prob is 0). `VLLMGenerator` removes the forced token: the
rollout's response ends at the stopping token, truncated, flagged in `Rollout.repetition_stop`,
as on the HF backend. It finds the stops from the returned tokens with the same kernel, so a
stop at the last allowed token (where vLLM ends the request by length, with nothing left to
force) is found too, and the flags never depend on this processor's bookkeeping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from longcot.kernels import repetition_state, repetition_update
from longcot.kernels.repetition_update import RepetitionState

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

EXTRA_ARG = "longcot_stop_on_repetition"
PATH = f"{__name__}:RepetitionStopLogitsProcessor"  # what the engine argument names


def parse_spec(spec: Any) -> tuple[int, int, int]:
    """(n, min_repeats, eos_token_id) from a request's ``extra_args[EXTRA_ARG]``."""
    ok = (isinstance(spec, (list, tuple)) and len(spec) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) for v in spec))
    if not ok or spec[0] < 1 or spec[1] < 2 or spec[2] < 0:
        raise ValueError(f"extra_args[{EXTRA_ARG!r}]: expected [n >= 1, min_repeats >= 2, eos_token_id >= 0], "
                         f"got {spec!r}")
    return int(spec[0]), int(spec[1]), int(spec[2])


def clear_row(state: RepetitionState, row: int) -> None:
    """Make ``state``'s row ``row`` empty again, in place (as `repetition_state` makes it: every
    tensor 0, the hash table's first-occurrence starts -1 for empty slots)."""
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            value[row] = -1 if f.name == "slot_start" else 0
    if state.history is not None:
        state.history[row] = []
    if state.grams is not None:
        state.grams[row] = {}


@dataclass
class _Request:
    output: list[int]  # vLLM's live output token list (a reference)
    table: _Table
    row: int  # the request's row in its table's state
    min_repeats: int
    eos: int
    need: int  # the most output tokens it can have
    consumed: int = 0  # output tokens counted so far
    fired: bool = False  # its newest counted token completed a repeat: force end-of-sequence


class _Table:
    """The kernel state of all tracked requests with one n (the state is per n). Rows and length
    grow on demand (a new state, with the tracked requests' counted tokens replayed into it)."""

    def __init__(self, n: int):
        self.n = n
        self.state: RepetitionState | None = None
        self.requests: list[_Request] = []

    def admit(self, new: list[_Request]) -> None:
        """Give each of ``new`` a row: a free one (cleared) when the state has room for it, else
        one of a new, larger state (one rebuild for all of them: vLLM adds a whole batch at once)."""
        used = {r.row for r in self.requests}
        rows = 0 if self.state is None else self.state.batch
        free = [i for i in range(rows) if i not in used]
        self.requests += new
        if len(free) >= len(new) and max(r.need for r in new) <= self.state.max_len:
            for request, row in zip(new, free):
                request.row = row
                clear_row(self.state, row)
            return
        rows = max(rows, _pow2(len(self.requests)))
        for request, row in zip(new, (i for i in range(rows) if i not in used)):
            request.row = row
        self._rebuild(rows, max(r.need for r in self.requests))

    def release(self, request: _Request) -> None:
        self.requests.remove(request)  # its row is cleared when a request reuses it
        if not self.requests:
            self.state = None  # nothing tracked: no memory held between rollouts

    def _rebuild(self, rows: int, max_len: int) -> None:
        counted = [r.consumed for r in self.requests]
        self.state = repetition_state(rows, max_len, self.n, "cpu")
        for r in self.requests:
            r.consumed = 0
        self._feed(counted)  # replay what was counted (the flags stay as they are)

    def count(self) -> None:
        """Feed every tracked request's new tokens to the kernel and mark the requests whose newest
        token completed a repeat."""
        longest = max(len(r.output) for r in self.requests)
        if longest > self.state.max_len:  # more tokens than a request announced
            self._rebuild(self.state.batch, max(longest, 2 * self.state.max_len))
        self._feed(None)

    def _feed(self, limits: list[int] | None) -> None:
        """One kernel call per token column: each request's tokens from ``consumed`` up to its
        limit (replaying) or to the end of its output list (counting, which also sets ``fired``;
        a fired request is not counted further: it ends at the next step)."""
        while True:
            new = [0] * self.state.batch  # host lists: an element write to a tensor costs a microsecond
            active = [False] * self.state.batch
            fed = []
            for i, r in enumerate(self.requests):
                end = len(r.output) if limits is None else limits[i]
                if r.consumed >= end or (limits is None and r.fired):
                    continue
                token = r.output[r.consumed]
                if token < 0:  # an async-scheduling placeholder: not sampled yet
                    continue
                new[r.row] = token
                active[r.row] = True
                fed.append((r, token))
            if not fed:
                return
            step = repetition_update(self.state, torch.tensor(new, dtype=torch.int64), torch.tensor(active))
            occurrences = step.occurrences.tolist()
            for r, token in fed:
                r.consumed += 1
                if limits is None and occurrences[r.row] >= r.min_repeats and token != r.eos:
                    r.fired = True


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


class RepetitionStopLogitsProcessor(LogitsProcessor):
    """Forces the end-of-sequence token on a request whose newest token completed the
    ``min_repeats``-th occurrence of an n-gram, for requests that ask for it (module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        spec = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if spec is not None:
            parse_spec(spec)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.requests: dict[int, _Request] = {}  # batch index -> tracked request
        self.tables: dict[int, _Table] = {}  # n -> its table

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy token of a stopped request

    def _release(self, index: int) -> None:
        request = self.requests.pop(index, None)
        if request is not None:
            request.table.release(request)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._release(index)
        new: dict[int, list[_Request]] = {}  # per n
        for index, params, _, output in batch_update.added:
            self._release(index)  # an added request may replace the one at its index
            spec = (params.extra_args or {}).get(EXTRA_ARG)
            if spec is None:
                continue
            n, min_repeats, eos = parse_spec(spec)
            table = self.tables.setdefault(n, _Table(n))
            request = _Request(output, table, -1, min_repeats, eos, int(params.max_tokens or self.max_model_len))
            new.setdefault(n, []).append(request)
            self.requests[index] = request
        for n, requests in new.items():
            self.tables[n].admit(requests)
        for a, b, direction in batch_update.moved:
            moving = self.requests.pop(a, None)
            other = self.requests.pop(b, None)
            if moving is not None:
                self.requests[b] = moving
            if other is not None:
                if direction == MoveDirectionality.SWAP:
                    self.requests[a] = other
                else:  # replaced by the one moved there
                    other.table.release(other)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        for table in self.tables.values():
            if table.requests:
                table.count()
        fired = [(index, r.eos) for index, r in self.requests.items() if r.fired and index < logits.shape[0]]
        if fired:
            rows = torch.tensor([i for i, _ in fired], device=logits.device)
            eos = torch.tensor([e for _, e in fired], device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, eos] = 0.0
        return logits
