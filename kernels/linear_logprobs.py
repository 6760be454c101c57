"""Per-token log-probabilities (and entropy) straight from hidden states and the LM-head weight.

logits = hidden @ weight.T, then the same as `token_logprobs`. This is the op the trainer uses
for the policy and reference models, so that fast paths can avoid the [N, V] logits entirely.

Implementations:

- the reference: the full fp32 logits, then `token_logprobs_reference`;
- chunked PyTorch (``linear_token_logprobs_chunked``, the default for CPU tensors): the logits
  are computed one [rows x cols] tile at a time (``hidden[rows] @ weight[cols].T``), with an
  online log-sum-exp over the vocabulary blocks; the backward recomputes each tile and turns it
  into d hidden (dx @ weight) and d weight (dx.T @ hidden), so no [N, V] tensor is ever held;
- Triton (CUDA tensors; CPU tensors with ``LONGCOT_KERNELS=triton`` and ``TRITON_INTERPRET=1``):
  the forward tiles over tokens and vocabulary with ``tl.dot`` per tile and an online
  log-sum-exp; the backward recomputes each (tokens, vocab) tile and adds its share of d hidden
  and d weight with fp32 atomic adds.

The token's own logit enters logp linearly, so its gradient is separate from the softmax's:
with x = hidden @ weight.T / T, d logp_n / d hidden_n = (weight[tok_n] - E_p[weight]) / T.
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select
from .logprobs import (
    CHUNK_BYTES,
    check_tokens_in_vocab,
    check_triton_device,
    jit,
    tl,
    token_logprobs_reference,
    triton_interpreted,
)


def _check(hidden: object, weight: object, tokens: object, temperature: object):
    hidden = _checks.tensor("hidden", hidden)
    _checks.rank("hidden", hidden, 2, "[N, H]")
    _checks.floating("hidden", hidden)
    weight = _checks.tensor("weight", weight)
    _checks.rank("weight", weight, 2, "[V, H]")
    _checks.floating("weight", weight)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight: expected shape [V, {hidden.shape[1]}] (H from hidden), got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"weight: expected at least one vocabulary row, got {tuple(weight.shape)}")
    _checks.same_device("weight", weight, "hidden", hidden.device)
    tokens = _checks.tensor("tokens", tokens)
    _checks.integer("tokens", tokens)
    _checks.same_shape("tokens", tokens, "hidden.shape[:1]", hidden.shape[:1])
    _checks.same_device("tokens", tokens, "hidden", hidden.device)
    check_tokens_in_vocab(tokens, weight.shape[0])
    return hidden, weight, tokens, _checks.temperature(temperature)


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    logits = hidden.float() @ weight.float().T
    return token_logprobs_reference(logits, tokens, temperature, return_entropy)


# ---------------------------------------------------------------------------------------------
# Chunked PyTorch (CPU default)


def _tile_shape(n: int, chunk_rows: int | None, chunk_cols: int | None) -> tuple[int, int]:
    rows = max(1, int(chunk_rows)) if chunk_rows else max(1, min(n, 2048))
    cols = max(1, int(chunk_cols)) if chunk_cols else max(128, CHUNK_BYTES // (4 * rows))
    return rows, cols


def _token_logits(hf: torch.Tensor, weight: torch.Tensor, tok: torch.Tensor, rows: int) -> torch.Tensor:
    """x_tok[n] = hf[n] . weight[tok[n]] (before the temperature), a row chunk at a time."""
    out = torch.empty(hf.shape[0], dtype=torch.float32, device=hf.device)
    for r0 in range(0, hf.shape[0], rows):
        r1 = min(hf.shape[0], r0 + rows)
        out[r0:r1] = (hf[r0:r1] * weight[tok[r0:r1]].float()).sum(1)
    return out


class _ChunkedLinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, return_entropy, rows, cols):
        n, vocab, t = hidden.shape[0], weight.shape[0], temperature
        tok = tokens.long()
        hf = hidden.float()
        m = torch.empty(n, dtype=torch.float32, device=hidden.device)
        s, u = torch.empty_like(m), torch.empty_like(m)  # sum e^(x-m), sum e^(x-m) (x-m)
        for v0 in range(0, vocab, cols):
            wb = weight[v0 : v0 + cols].float()
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                x = torch.mm(hf[r0:r1], wb.T)
                if t != 1.0:
                    x.div_(t)
                bm = x.amax(1)
                if v0 == 0:
                    m_new = bm
                else:
                    m_old = m[r0:r1]
                    m_new = torch.maximum(m_old, bm)
                    shift = m_old - m_new
                    alpha = shift.exp()
                x.sub_(m_new[:, None])
                if return_entropy:
                    e = x.exp()
                    sb = e.sum(1)
                    ub = e.mul_(x).sum(1)
                    del e
                    if v0 == 0:
                        u[r0:r1] = ub
                    else:
                        u[r0:r1] = alpha * (u[r0:r1] + shift * s[r0:r1]) + ub
                else:
                    sb = x.exp_().sum(1)
                s[r0:r1] = sb if v0 == 0 else s[r0:r1] * alpha + sb
                m[r0:r1] = m_new
                del x
        log_s = s.log()
        lse = m + log_s
        x_tok = _token_logits(hf, weight, tok, rows)
        if t != 1.0:
            x_tok.div_(t)
        logp = x_tok - lse
        ent = log_s - u / s if return_entropy else None
        ctx.save_for_backward(hidden, weight, tok, lse, *([ent] if return_entropy else []))
        ctx.temperature, ctx.rows, ctx.cols = t, rows, cols
        ctx.set_materialize_grads(False)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, tok, lse, *rest = ctx.saved_tensors
        ent = rest[0] if rest else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 5
        if not (need_h or need_w) or (g_logp is None and g_ent is None):
            return (None, None, *none)
        t, rows, cols = ctx.temperature, ctx.rows, ctx.cols
        n, vocab = hidden.shape[0], weight.shape[0]
        hf = hidden.float()
        hs = hf / t if t != 1.0 else hf
        gl = None if g_logp is None else g_logp.float()
        ge = None if g_ent is None else g_ent.float()
        dh = torch.zeros(hf.shape, dtype=torch.float32, device=hf.device) if need_h else None
        # every block of grad_w is written by its first row chunk; with no rows, it is zero
        grad_w = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if need_w else None
        for v0 in range(0, vocab if n else 0, cols):
            v1 = min(vocab, v0 + cols)
            wb = weight[v0:v1].float()
            if need_w:
                dwb = grad_w[v0:v1] if grad_w.dtype == torch.float32 else None
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                y = torch.mm(hf[r0:r1], wb.T)
                if t != 1.0:
                    y.div_(t)
                y.sub_(lse[r0:r1, None])  # log-probs of the tile
                if ge is not None:
                    # dx = -p * (g_logp + g_ent * (logp + H)), the onehot term apart
                    p = y.exp()
                    dx = y.add_(ent[r0:r1, None]).mul_(ge[r0:r1, None])
                    if gl is not None:
                        dx.add_(gl[r0:r1, None])
                    dx.mul_(p).neg_()
                    del p
                else:
                    dx = y.exp_().mul_(-gl[r0:r1, None])
                if need_h:
                    dh[r0:r1].addmm_(dx, wb)
                if need_w:
                    if dwb is None:
                        dwb = torch.mm(dx.T, hs[r0:r1])
                    elif r0 == 0:
                        torch.mm(dx.T, hs[r0:r1], out=dwb)
                    else:
                        dwb.addmm_(dx.T, hs[r0:r1])
                del dx, y
            if need_w:
                if gl is not None:  # the token's own logit: d W[tok_n] += g_n * hidden_n / T
                    sel = ((tok >= v0) & (tok < v1)).nonzero()[:, 0]
                    if sel.numel():
                        dwb.index_add_(0, tok[sel] - v0, gl[sel, None] * hs[sel])
                if dwb.data_ptr() != grad_w[v0:v1].data_ptr():
                    grad_w[v0:v1] = dwb
        grad_h = None
        if need_h:
            if gl is not None:
                for r0 in range(0, n, rows):
                    r1 = min(n, r0 + rows)
                    dh[r0:r1] += gl[r0:r1, None] * weight[tok[r0:r1]].float()
            if t != 1.0:
                dh.div_(t)
            grad_h = dh.to(hidden.dtype)
        return (grad_h, grad_w, *none)


def linear_token_logprobs_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_rows: int | None = None,
    chunk_cols: int | None = None,
):
    """The CPU path: logits one [chunk_rows x chunk_cols] tile at a time (default: up to 2048
    rows and about ``CHUNK_BYTES`` of fp32 per tile), forward and backward. Not re-checked."""
    if chunk_rows is None and chunk_cols is None and 4 * hidden.shape[0] * weight.shape[0] <= CHUNK_BYTES:
        # All the logits fit in one tile: holding them is what chunking would do anyway, and
        # plain autograd is several times faster than the tile loop at small sizes (the
        # built-in task's 20-token vocabulary).
        return linear_token_logprobs_reference(hidden, weight, tokens, temperature, return_entropy)
    rows, cols = _tile_shape(hidden.shape[0], chunk_rows, chunk_cols)
    return _ChunkedLinearTokenLogprobs.apply(
        hidden, weight, tokens, float(temperature), bool(return_entropy), rows, cols
    )


# ---------------------------------------------------------------------------------------------
# Triton


def _linear_fwd_kernel(
    h_ptr, w_ptr, tokens_ptr, logp_ptr, lse_ptr, ent_ptr,
    N, V, H, stride_hn, stride_hh, stride_wv, stride_wh, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ENT: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tok = tl.load(tokens_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_H)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    x_tok = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            k_ok = k < H
            h = tl.load(h_ptr + rows64[:, None] * stride_hn + k[None, :] * stride_hh,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols64[None, :] * stride_wv + k[:, None] * stride_wh,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if CAST_FP32:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(h, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        x = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))
        x_tok += tl.sum(tl.where(cols64[None, :] == tok[:, None], x, 0.0), 1)
        m_new = tl.maximum(m, tl.max(x, 1))
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp(shift)
        e = tl.exp(x - m_new[:, None])
        if HAS_ENT:
            d = e * tl.where(e > 0, x - m_new[:, None], 0.0)
            u = alpha * (u + shift * s) + tl.sum(d, 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new
    log_s = tl.log(s)
    tl.store(logp_ptr + rows64, x_tok - m - log_s, mask=row_ok)
    tl.store(lse_ptr + rows64, m + log_s, mask=row_ok)
    if HAS_ENT:
        tl.store(ent_ptr + rows64, log_s - u / s, mask=row_ok)


def _linear_bwd_kernel(
    h_ptr, w_ptr, tokens_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dh_ptr, dw_ptr,
    N, V, H, stride_hn, stride_hh, stride_wv, stride_wh, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, NEED_H: tl.constexpr,
    NEED_W: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        k_ok = k < H
        h = tl.load(h_ptr + rows64[:, None] * stride_hn + k[None, :] * stride_hh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[None, :] * stride_wv + k[:, None] * stride_wh,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if CAST_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    tok = tl.load(tokens_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    logp = acc * inv_t - lse[:, None]
    p = tl.exp(logp)
    g = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_G_LOGP:
        g = tl.load(g_logp_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    coef = tl.broadcast_to(g[:, None], (BLOCK_N, BLOCK_V))
    if HAS_G_ENT:
        ent = tl.load(ent_ptr + rows64, mask=row_ok, other=0.0)
        ge = tl.load(g_ent_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
        coef = coef + ge[:, None] * (logp + ent[:, None])
    dx = -p * coef + tl.where(cols64[None, :] == tok[:, None], g[:, None], 0.0)
    # d loss / d (hidden @ weight.T) = dx / T; zero outside the valid tile
    dx = tl.where(row_ok[:, None] & col_ok[None, :], dx * inv_t, 0.0)
    if CAST_FP32:
        dx_op = dx
    else:
        dx_op = dx.to(h_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        k_ok = k < H
        if NEED_H:
            w_t = tl.load(w_ptr + cols64[:, None] * stride_wv + k[None, :] * stride_wh,
                          mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if CAST_FP32:
                w_t = w_t.to(tl.float32)
            if IEEE:
                dh = tl.dot(dx_op, w_t, input_precision="ieee")
            else:
                dh = tl.dot(dx_op, w_t)
            tl.atomic_add(dh_ptr + rows64[:, None] * H + k[None, :], dh,
                          mask=row_ok[:, None] & k_ok[None, :])
        if NEED_W:
            h = tl.load(h_ptr + rows64[:, None] * stride_hn + k[None, :] * stride_hh,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if CAST_FP32:
                h = h.to(tl.float32)
            if IEEE:
                dw = tl.dot(tl.trans(dx_op), h, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(dx_op), h)
            tl.atomic_add(dw_ptr + cols64[:, None] * H + k[None, :], dw,
                          mask=col_ok[:, None] & k_ok[None, :])


def _launch_config(hidden: torch.Tensor, weight: torch.Tensor, backward: bool, interpreted: bool) -> dict:
    """Block sizes, num_warps and num_stages of the forward or backward kernel.

    `longcot bench compile` (tests/test_compile_targets.py) compiles every variant for sm_80,
    sm_89 and sm_90 and checks them against the per-block shared-memory limits, sm_89's 99 KB
    the smallest."""
    if interpreted:  # tl.dot needs blocks >= 16; small ones keep the interpreter quick
        return {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}
    if hidden.dtype == weight.dtype and hidden.element_size() == 2:
        # 16-bit tensor-core dots: 48 KB of shared memory in the backward, 24 KB forward
        return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3}
    # fp32 and mixed inputs stage fp32 operands and run IEEE fp32 dots on the FMA units. With the
    # 16-bit tiles the backward needed 112-144 KB of shared memory (over sm_89's 99 KB) and both
    # kernels sat at 255 registers with spills; these take 16-24 KB, and at H = 4096 ptxas
    # reports at most 8 bytes of spills on sm_80/sm_89/sm_90 (bench/RESULTS.md).
    if backward:
        return {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 16, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2}


def _dot_flags(hidden: torch.Tensor, weight: torch.Tensor, interpreted: bool) -> dict:
    # The interpreter's bf16 tl.dot returns garbage (DESIGN.md): it computes in fp32. On a GPU,
    # fp32 inputs use IEEE fp32 dots (not TF32), to match the fp32 reference.
    fp32 = hidden.dtype == torch.float32 and weight.dtype == torch.float32
    mixed = hidden.dtype != weight.dtype
    return {"CAST_FP32": interpreted or mixed or fp32, "IEEE": fp32 or mixed}


class _TritonLinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, return_entropy):
        n, hdim = hidden.shape
        vocab = weight.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if return_entropy else lse
        interpreted = triton_interpreted()
        blocks = _launch_config(hidden, weight, False, interpreted)
        if n:
            grid = (triton_cdiv(n, blocks["BLOCK_N"]),)
            jit(_linear_fwd_kernel)[grid](
                hidden, weight, tokens, logp, lse, ent,
                n, vocab, hdim, hidden.stride(0), hidden.stride(1),
                weight.stride(0), weight.stride(1), 1.0 / temperature,
                HAS_ENT=return_entropy, **_dot_flags(hidden, weight, interpreted), **blocks,
            )
        ctx.save_for_backward(hidden, weight, tokens, lse, *([ent] if return_entropy else []))
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, tokens, lse, *rest = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w) or (g_logp is None and g_ent is None):
            return None, None, None, None, None
        ent = rest[0] if rest else lse
        n, hdim = hidden.shape
        vocab = weight.shape[0]
        dh = torch.zeros((n, hdim), dtype=torch.float32, device=hidden.device) if need_h else lse
        dw = torch.zeros((vocab, hdim), dtype=torch.float32, device=hidden.device) if need_w else lse
        interpreted = triton_interpreted()
        blocks = _launch_config(hidden, weight, True, interpreted)
        if n:
            grid = (triton_cdiv(n, blocks["BLOCK_N"]), triton_cdiv(vocab, blocks["BLOCK_V"]))
            jit(_linear_bwd_kernel)[grid](
                hidden, weight, tokens, lse, ent,
                lse if g_logp is None else g_logp.contiguous(),
                lse if g_ent is None else g_ent.contiguous(),
                dh, dw, n, vocab, hdim, hidden.stride(0), hidden.stride(1),
                weight.stride(0), weight.stride(1), 1.0 / ctx.temperature,
                HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_ent is not None,
                NEED_H=need_h, NEED_W=need_w, **_dot_flags(hidden, weight, interpreted), **blocks,
            )
        grad_h = dh.to(hidden.dtype) if need_h else None
        grad_w = dw.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def linear_token_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """The Triton path (CUDA, or the interpreter on CPU tensors). Inputs are not re-checked."""
    check_triton_device(hidden)
    return _TritonLinearTokenLogprobs.apply(
        hidden, weight, tokens.contiguous(), float(temperature), bool(return_entropy)
    )


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """fp32 [N] log-probs of ``tokens`` under softmax(hidden @ weight.T / temperature).

    Returns ``logp``, or ``(logp, entropy)``. Differentiable with respect to hidden and weight.
    """
    hidden, weight, tokens, temperature = _check(hidden, weight, tokens, temperature)
    impl = select(hidden.device, cpu=True, triton=True, cpu_needs_extension=False, op="linear_token_logprobs")
    if impl == "triton":
        return linear_token_logprobs_triton(hidden, weight, tokens, temperature, return_entropy)
    if impl == "cpu":
        return linear_token_logprobs_chunked(hidden, weight, tokens, temperature, return_entropy)
    return linear_token_logprobs_reference(hidden, weight, tokens, temperature, return_entropy)
