"""Per-token log-probabilities (and entropy) of sampled tokens, from logits.

logp = log_softmax(logits / temperature)[token], in fp32 whatever the input dtype: sampling at
temperature t means the policy's distribution is softmax(logits / t), so PPO's ratios must be
taken under the same temperature. entropy = -sum_v p_v log p_v of that distribution.

Implementations:

- the reference (``token_logprobs_reference``): eager ``log_softmax(logits.float())`` and a gather,
  which holds an fp32 [N, V] tensor in the forward and two more in the backward;
- chunked PyTorch (``token_logprobs_chunked``, the default for CPU tensors): a few rows at a
  time, with an autograd.Function whose backward recomputes each chunk's softmax from the saved
  log-sum-exp, so neither pass holds more than one chunk in fp32;
- Triton (CUDA tensors; CPU tensors with ``LONGCOT_KERNELS=triton`` and ``TRITON_INTERPRET=1``):
  one program per row, one pass over the vocabulary with an online log-sum-exp (and the running
  sum that gives the entropy); the backward writes d logits = g (onehot - softmax) + the entropy
  term in the logits' dtype, with no fp32 [N, V] intermediate. Offsets are int64.

Gradients, with x = logits / T, lse = logsumexp(x), logp_j = x_j - lse, p = exp(logp) and
H = -sum p logp: d logp_tok / d x_j = [j == tok] - p_j and d H / d x_j = -p_j (logp_j + H).
"""

from __future__ import annotations

import os

import torch

from . import _checks
from ._backend import select

try:  # Triton is a Linux x86-64 dependency; elsewhere only its kernels are unavailable
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

# Bytes of fp32 work space per chunk of the CPU path (a few such buffers are alive at once).
CHUNK_BYTES = 8 << 20


def check_tokens_in_vocab(tokens: torch.Tensor, vocab: int) -> None:
    # Only on the CPU: on a GPU this would be a device sync per call, and an out-of-range id
    # there fails inside the kernel anyway.
    if tokens.device.type == "cpu" and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"tokens: expected ids in [0, {vocab}), got min {lo}, max {hi}")


def _check(logits: object, tokens: object, temperature: object):
    logits = _checks.tensor("logits", logits)
    _checks.floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    tokens = _checks.tensor("tokens", tokens)
    _checks.integer("tokens", tokens)
    _checks.same_shape("tokens", tokens, "logits.shape[:-1]", logits.shape[:-1])
    _checks.same_device("tokens", tokens, "logits", logits.device)
    check_tokens_in_vocab(tokens, logits.shape[-1])
    return logits, tokens, _checks.temperature(temperature)


def token_logprobs_reference(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
):
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    logp = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# Chunked PyTorch (CPU default)


def _rows_2d(logits: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _unflatten(out, shape: torch.Size):
    if isinstance(out, tuple):
        return tuple(_unflatten(o, shape) for o in out)
    return out if out.shape == shape else out.reshape(shape)


def _scaled_chunk(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy of ``chunk / temperature`` (safe to modify in place)."""
    if chunk.dtype == torch.float32 and temperature != 1.0:
        return chunk / temperature
    x = chunk.to(torch.float32, copy=True)
    return x.div_(temperature) if temperature != 1.0 else x


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, CHUNK_BYTES // (4 * vocab))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, return_entropy, rows_per_chunk):
        n = logits.shape[0]
        tok = tokens.long()
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if return_entropy else None
        for r0 in range(0, n, rows_per_chunk):
            r1 = min(n, r0 + rows_per_chunk)
            y = _scaled_chunk(logits[r0:r1], temperature)
            m = y.amax(-1, keepdim=True)
            y.sub_(m)  # y = x - max
            y_tok = y.gather(1, tok[r0:r1, None])[:, 0]
            if return_entropy:
                e = y.exp()
                s = e.sum(-1)
                u = e.mul_(y).sum(-1)  # sum_j exp(y_j) y_j
                log_s = s.log()
                ent[r0:r1] = log_s - u / s
            else:
                log_s = y.exp_().sum(-1).log_()
            logp[r0:r1] = y_tok - log_s
            lse[r0:r1] = m[:, 0] + log_s
        ctx.save_for_backward(logits, tok, lse, *([ent] if return_entropy else []))
        ctx.temperature, ctx.rows_per_chunk = temperature, rows_per_chunk
        ctx.set_materialize_grads(False)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        logits, tok, lse, *rest = ctx.saved_tensors
        ent = rest[0] if rest else None
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return None, None, None, None, None
        t, n, step = ctx.temperature, logits.shape[0], ctx.rows_per_chunk
        grad = torch.empty_like(logits)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            y = _scaled_chunk(logits[r0:r1], t).sub_(lse[r0:r1, None])  # log-probs of the chunk
            gl = None if g_logp is None else g_logp[r0:r1].float()
            if g_ent is not None:
                # dx = -p * (g_logp + g_ent * (logp + H))
                p = y.exp()
                dx = y.add_(ent[r0:r1, None]).mul_(g_ent[r0:r1, None].float())
                if gl is not None:
                    dx.add_(gl[:, None])
                dx.mul_(p).neg_()
                del p
            else:
                dx = y.exp_().mul_(-gl[:, None])
            if gl is not None:
                dx.scatter_add_(1, tok[r0:r1, None], gl[:, None])
            if t != 1.0:
                dx.div_(t)
            grad[r0:r1] = dx
        return grad, None, None, None, None


def token_logprobs_chunked(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_rows: int | None = None,
):
    """The CPU path: like the reference, but over ``chunk_rows`` rows at a time (default: about
    ``CHUNK_BYTES`` of fp32 per chunk), forward and backward. Inputs are not re-checked."""
    if chunk_rows is None and 4 * logits.numel() <= CHUNK_BYTES:  # one chunk: plain autograd is faster
        return token_logprobs_reference(logits, tokens, temperature, return_entropy)
    shape = logits.shape[:-1]
    flat = _rows_2d(logits)
    rows = _chunk_rows(flat.shape[1], chunk_rows)
    out = _ChunkedTokenLogprobs.apply(
        flat, tokens.reshape(-1), float(temperature), bool(return_entropy), rows
    )
    return _unflatten(out, shape)


# ---------------------------------------------------------------------------------------------
# Triton

def _interpret_flag() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Triton jits its own standard library (tl.sum, tl.max, ...) when it is imported, in the mode
# TRITON_INTERPRET names then; kernels can only run in that mode.
_INTERPRETED = triton is not None and _interpret_flag()
_JITTED: dict = {}


def triton_interpreted() -> bool:
    """Whether the Triton kernels run through Triton's interpreter (on CPU tensors)."""
    return _INTERPRETED


def jit(fn):
    """``triton.jit(fn)``, done on first use (importing longcot compiles nothing)."""
    if fn not in _JITTED:
        if triton is None:
            raise RuntimeError("LONGCOT_KERNELS=triton: Triton is not installed")
        _JITTED[fn] = triton.jit(fn)
    return _JITTED[fn]


def check_triton_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":  # compiled, or interpreted (the interpreter copies to the host)
        return
    if t.device.type == "cpu" and _INTERPRETED:
        return
    if t.device.type == "cpu" and _interpret_flag():
        raise RuntimeError(
            "LONGCOT_KERNELS=triton: TRITON_INTERPRET=1 was set after Triton was imported; "
            "set it before importing longcot (or torch code that imports Triton)"
        )
    raise RuntimeError(
        f"LONGCOT_KERNELS=triton: the Triton kernels need CUDA tensors, or CPU tensors with "
        f"TRITON_INTERPRET=1 (Triton's interpreter) set before import; got a tensor on "
        f"{t.device} with the interpreter {'on' if _INTERPRETED else 'off'}"
    )


def _token_logprobs_fwd_kernel(
    logits_ptr, tokens_ptr, logp_ptr, lse_ptr, ent_ptr,
    V, stride_row, inv_t,
    BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    u = tl.zeros((), tl.float32)  # sum exp(x - m) (x - m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        valid = cols < V
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)  # 0 before the first block
        alpha = tl.exp(shift)
        e = tl.where(valid, tl.exp(x - m_new), 0.0)
        if HAS_ENT:
            d = e * tl.where(e > 0, x - m_new, 0.0)  # 0, not 0 * -inf, at masked columns
            u = alpha * (u + shift * s) + tl.sum(d, 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    x_tok = tl.load(base + tok).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, x_tok - m - log_s)
    tl.store(lse_ptr + row, m + log_s)
    if HAS_ENT:
        tl.store(ent_ptr + row, log_s - u / s)


def _token_logprobs_bwd_kernel(
    logits_ptr, tokens_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, grad_ptr,
    V, stride_row, stride_grad, inv_t,
    BLOCK_V: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * stride_grad
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    g = tl.zeros((), tl.float32)
    if HAS_G_LOGP:
        g = tl.load(g_logp_ptr + row).to(tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        valid = cols < V
        x = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_t
        logp = x - lse
        p = tl.exp(logp)
        coef = g
        if HAS_G_ENT:
            h = tl.load(ent_ptr + row)
            ge = tl.load(g_ent_ptr + row).to(tl.float32)
            coef = coef + ge * (logp + h)
        dx = (-p * coef + tl.where(cols == tok, g, 0.0)) * inv_t
        if ROUND_BF16:
            # The interpreter truncates fp32 -> bf16; add half an ulp (ties to even) first so
            # that it rounds to nearest like the GPU does.
            bits = dx.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            dx = bits.to(tl.float32, bitcast=True)
        tl.store(gbase + cols, dx.to(grad_ptr.dtype.element_ty), mask=valid)


def _block_v(vocab: int, interpreted: bool) -> int:
    if interpreted:  # small blocks: several per row, so tests cover the loop and its tail
        return 64
    return min(4096, triton.next_power_of_2(vocab))


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, return_entropy):
        n, vocab = logits.shape
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if return_entropy else lse  # lse: an unused placeholder
        interpreted = triton_interpreted()
        block = _block_v(vocab, interpreted)
        if n:
            jit(_token_logprobs_fwd_kernel)[(n,)](
                logits, tokens, logp, lse, ent, vocab, logits.stride(0), 1.0 / temperature,
                BLOCK_V=block, HAS_ENT=return_entropy,
                **({} if interpreted else {"num_warps": 8 if block >= 2048 else 4}),
            )
        ctx.save_for_backward(logits, tokens, lse, *([ent] if return_entropy else []))
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        logits, tokens, lse, *rest = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return None, None, None, None
        ent = rest[0] if rest else lse
        n, vocab = logits.shape
        grad = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
        interpreted = triton_interpreted()
        block = _block_v(vocab, interpreted)
        g_logp_c = lse if g_logp is None else g_logp.contiguous()
        g_ent_c = lse if g_ent is None else g_ent.contiguous()
        if n:
            jit(_token_logprobs_bwd_kernel)[(n,)](
                logits, tokens, lse, ent, g_logp_c, g_ent_c, grad,
                vocab, logits.stride(0), grad.stride(0), 1.0 / ctx.temperature,
                BLOCK_V=block, HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_ent is not None,
                ROUND_BF16=interpreted and grad.dtype == torch.bfloat16,
                **({} if interpreted else {"num_warps": 8 if block >= 2048 else 4}),
            )
        return grad, None, None, None


def token_logprobs_triton(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
):
    """The Triton path (CUDA, or the interpreter on CPU tensors). Inputs are not re-checked."""
    check_triton_device(logits)
    shape = logits.shape[:-1]
    flat = _rows_2d(logits)
    tok = tokens.reshape(-1).contiguous()
    out = _TritonTokenLogprobs.apply(flat, tok, float(temperature), bool(return_entropy))
    return _unflatten(out, shape)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
):
    """fp32 log-probs of ``tokens`` under softmax(logits / temperature), shape ``logits.shape[:-1]``.

    Returns ``logp``, or ``(logp, entropy)`` with ``return_entropy=True``. Differentiable with
    respect to ``logits``.
    """
    logits, tokens, temperature = _check(logits, tokens, temperature)
    impl = select(logits.device, cpu=True, triton=True, cpu_needs_extension=False, op="token_logprobs")
    if impl == "triton":
        return token_logprobs_triton(logits, tokens, temperature, return_entropy)
    if impl == "cpu":
        return token_logprobs_chunked(logits, tokens, temperature, return_entropy)
    return token_logprobs_reference(logits, tokens, temperature, return_entropy)
