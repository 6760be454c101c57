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
  log-sum-exp. The backward goes over the vocabulary in chunks of about ``BWD_CHUNK_BYTES`` of
  d logits (1 GiB: 32,768 columns at N = 16,384 in bf16, 5 passes at V = 151,936): for each
  chunk, ``_linear_dlogits_kernel`` recomputes the [N, chunk] logits tile by tile (a GEMM with an
  elementwise epilogue) and writes d logits = d loss / d (hidden @ weight.T) in the products'
  dtype; then cuBLAS forms d weight[chunk] = d logits.T @ hidden (complete: written once) and
  d hidden += d logits @ weight[chunk] (summed over the chunks in fp32). No atomics: every output
  element is written by one program or one GEMM.

Why this backward. Per backward it costs 6 N V H flops (the logits recomputed once, two
products), the same as the fused kernel it replaces, which accumulated d weight and d hidden
with fp32 atomic adds from every (token block, vocabulary block) tile: N/64 adds per d weight
element and V/128 per d hidden element in bf16 (N/32 and V/64 in fp32), 2.4e11 atomics at
N = 16,384, V = 151,936, H = 4,096, and one 96-136 KB block per SM. The extra memory traffic is
d logits written once and read twice, 3 N V bytes x its element size: 15 GB in bf16 at those
sizes, ~5 ms at 3 TB/s against ~90 ms of tensor-core work for the 6.1e13 flops. A Triton-only
backward in which each program owns a d hidden or d weight tile (no d logits buffer) would need
the full H contraction of every logit it touches: at H = 4,096 either a [BLOCK, H] fp32
accumulator per program (1 MB at 64 rows) or the logits recomputed H / BLOCK_H times (32x at
BLOCK_H = 128); the d logits buffer and cuBLAS' per-architecture GEMMs avoid both.

Precision. Log-probs and entropy are fp32 whatever the inputs. 16-bit inputs: the dots are
tensor-core bf16/fp16 dots with fp32 accumulation, d logits are rounded to the inputs' dtype for
the two products (as eager autograd of a bf16 LM head does), d weight and a one-chunk d hidden
are rounded once from cuBLAS' fp32 accumulators, a multi-chunk d hidden sums the chunks in fp32
(``out_dtype=torch.float32`` on CUDA, torch >= 2.8). Inputs with an fp32 operand (fp32, or bf16
hidden states against an fp32 LM head): exact IEEE fp32 dots and fp32 d logits by default, the
same as the reference (1e-5 in the tests); with ``torch.backends.cuda.matmul.allow_tf32`` (which
``torch.set_float32_matmul_precision("high")`` sets) the Triton dots run on TF32 tensor cores and
cuBLAS' fp32 products do too: emulated on the CPU at H = 4,096 with logits of std 4 and T = 0.7,
logp moves by up to 6e-3 (operands rounded to TF32) to 3e-2 (truncated), entropy by up to 6e-3,
and the gradients by up to 2e-3 of their largest element. The flag is read at the forward and
the backward uses the same precision, so the recomputed logits agree with the saved log-sum-exp.

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


def _linear_dlogits_kernel(
    h_ptr, w_ptr, tokens_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dl_ptr,
    N, H, v0, V_END, stride_hn, stride_hh, stride_wv, stride_wh, stride_dn, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """dl[n, c] = d loss / d (hidden @ weight.T)[n, v0 + c] for the vocabulary columns [v0, V_END):
    one [BLOCK_N, BLOCK_V] tile of logits per program (a K loop of tl.dot over H), turned into
    (onehot * g - p * (g + g_ent * (logp + ent))) / T and stored in dl's dtype. No atomics: each
    program writes its own tile."""
    # grouped order: GROUP_N row blocks sweep the vocabulary blocks together (L2 reuse of hidden)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V_END - v0, BLOCK_V)
    per_group = GROUP_N * num_v
    first = (pid // per_group) * GROUP_N
    size = min(num_n - first, GROUP_N)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    cols = v0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V_END
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
    dx = (tl.where(cols64[None, :] == tok[:, None], g[:, None], 0.0) - p * coef) * inv_t
    tl.store(dl_ptr + rows64[:, None] * stride_dn + (cols64 - v0)[None, :],
             dx.to(dl_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Bytes of the [N, columns] d logits buffer of one backward pass over a vocabulary chunk (the
# Triton backward's work space; module-level so tests can force several chunks).
BWD_CHUNK_BYTES = 1 << 30


def _ieee(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the dots run in IEEE fp32: inputs with an fp32 operand, unless torch allows TF32 for
    fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32``, set by
    ``torch.set_float32_matmul_precision("high")``; off by default), the flag that also decides
    the backward's cuBLAS products."""
    fp32_operand = hidden.dtype == torch.float32 or weight.dtype == torch.float32
    return fp32_operand and not torch.backends.cuda.matmul.allow_tf32


def _launch_config(hidden: torch.Tensor, weight: torch.Tensor, backward: bool, interpreted: bool,
                   ieee: bool | None = None) -> dict:
    """Block sizes, num_warps and num_stages of the forward kernel or the backward's d logits
    kernel (``ieee``: the dots' precision, ``_ieee(hidden, weight)`` when None).

    `longcot bench compile` (tests/test_compile_targets.py) compiles every variant for sm_80,
    sm_89 and sm_90 and checks them against the per-block shared-memory limits, sm_89's 99 KB
    the smallest; one configuration per variant serves all three targets."""
    if interpreted:  # tl.dot needs blocks >= 16; small ones keep the interpreter quick
        blocks = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}
        return {**blocks, "GROUP_N": 2} if backward else blocks
    if ieee is None:
        ieee = _ieee(hidden, weight)
    sixteen = hidden.dtype == weight.dtype and hidden.element_size() == 2
    # Chosen from `longcot bench compile` at both shape sets (H = 24 and 4,096): the largest tiles
    # with no spills on sm_80/sm_89/sm_90 for 16-bit inputs (bench/RESULTS.md has the table).
    if not backward:
        if sixteen:  # tensor-core dots: 24 KB of shared memory (36 KB on sm_90)
            return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3}
        if ieee:  # fp32 FMA dots (fp32 or mixed inputs): 16-20 KB
            return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}
        # TF32 tensor-core dots on fp32 operands: 20-28 KB (36-48 KB on sm_90)
        return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}
    # The d logits kernel is a GEMM with an elementwise epilogue.
    if sixteen:  # tensor-core dots: 32-48 KB (64 KB on sm_90)
        return {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 4, "GROUP_N": 8}
    if ieee:  # fp32 FMA dots: 20-24 KB
        return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 16, "num_warps": 8, "num_stages": 3, "GROUP_N": 8}
    # TF32 tensor-core dots: 36-48 KB (52-72 KB on sm_90)
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3, "GROUP_N": 8}


def _dot_flags(hidden: torch.Tensor, weight: torch.Tensor, interpreted: bool, ieee: bool) -> dict:
    # The interpreter's bf16 tl.dot returns garbage (DESIGN.md): it computes in fp32. On a GPU,
    # inputs with an fp32 operand use IEEE fp32 dots unless TF32 is allowed (``_ieee``).
    fp32 = hidden.dtype == torch.float32 and weight.dtype == torch.float32
    mixed = hidden.dtype != weight.dtype
    return {"CAST_FP32": interpreted or mixed or fp32, "IEEE": ieee}


_MM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in fp32 (acc fp32). With 16-bit a and b on CUDA (torch >= 2.8) cuBLAS writes
    the product in fp32 straight from its fp32 accumulators (``out_dtype``); elsewhere the
    operands are cast to fp32 first: the product is never rounded to 16 bits either way."""
    if a.dtype == b.dtype == torch.float32:
        return acc.addmm_(a, b)
    if _MM_OUT_DTYPE and a.dtype == b.dtype and a.device.type in ("cuda", "meta"):
        return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    return acc.addmm_(a.float(), b.float())


def _vocab_chunk(n: int, vocab: int, element_size: int, block_v: int) -> int:
    """Columns of one backward pass: a [n, columns] d logits buffer of about BWD_CHUNK_BYTES, in
    whole vocabulary blocks (at least one)."""
    cols = BWD_CHUNK_BYTES // max(1, n * element_size)
    return min(vocab, max(block_v, cols // block_v * block_v))


class _TritonLinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, return_entropy):
        n, hdim = hidden.shape
        vocab = weight.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if return_entropy else lse
        interpreted = triton_interpreted()
        ieee = _ieee(hidden, weight)
        blocks = _launch_config(hidden, weight, False, interpreted, ieee)
        if n:
            grid = (triton_cdiv(n, blocks["BLOCK_N"]),)
            jit(_linear_fwd_kernel)[grid](
                hidden, weight, tokens, logp, lse, ent,
                n, vocab, hdim, hidden.stride(0), hidden.stride(1),
                weight.stride(0), weight.stride(1), 1.0 / temperature,
                HAS_ENT=return_entropy, **_dot_flags(hidden, weight, interpreted, ieee), **blocks,
            )
        ctx.save_for_backward(hidden, weight, tokens, lse, *([ent] if return_entropy else []))
        ctx.temperature, ctx.ieee = temperature, ieee
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
        dev = hidden.device
        interpreted, ieee = triton_interpreted(), ctx.ieee
        blocks = _launch_config(hidden, weight, True, interpreted, ieee)
        # d logits in the inputs' dtype when both are 16-bit (tensor-core products), else fp32
        sixteen = hidden.dtype == weight.dtype and hidden.element_size() == 2
        dl_dtype = hidden.dtype if sixteen else torch.float32
        # the products' operands in d logits' dtype: a 16-bit operand against fp32 d logits (mixed
        # inputs) is cast, hidden once, weight a chunk at a time
        h_op = (hidden if hidden.dtype == dl_dtype else hidden.to(dl_dtype)) if need_w else None
        cols = _vocab_chunk(n, vocab, torch.finfo(dl_dtype).bits // 8, blocks["BLOCK_V"])
        chunks = [(v0, min(vocab, v0 + cols)) for v0 in range(0, vocab if n else 0, cols)]
        # d hidden sums over the vocabulary chunks: in place when it is fp32, else an fp32
        # accumulator rounded once at the end; one chunk writes it directly in hidden's dtype
        grad_h = dh = None
        if need_h:
            if len(chunks) == 1 and hidden.dtype == dl_dtype:
                grad_h = torch.empty((n, hdim), dtype=hidden.dtype, device=dev)
            else:
                dh = torch.zeros((n, hdim), dtype=torch.float32, device=dev)
        # d weight: each chunk writes its own rows, complete, in weight's dtype
        grad_w = None
        if need_w:
            grad_w = (torch.empty_like(weight, memory_format=torch.contiguous_format) if n
                      else torch.zeros_like(weight, memory_format=torch.contiguous_format))
        flags = _dot_flags(hidden, weight, interpreted, ieee)
        kernel = jit(_linear_dlogits_kernel)
        g_logp_arg = lse if g_logp is None else g_logp.contiguous()
        g_ent_arg = lse if g_ent is None else g_ent.contiguous()
        # The interpreter's fp32 -> bf16 cast truncates (DESIGN.md): there the kernel writes fp32
        # and torch rounds to nearest, as the compiled kernel's cast does.
        kernel_dtype = torch.float32 if interpreted else dl_dtype
        for v0, v1 in chunks:
            dl = torch.empty((n, v1 - v0), dtype=kernel_dtype, device=dev)
            grid = (triton_cdiv(n, blocks["BLOCK_N"]) * triton_cdiv(v1 - v0, blocks["BLOCK_V"]),)
            kernel[grid](
                hidden, weight, tokens, lse, ent, g_logp_arg, g_ent_arg, dl,
                n, hdim, v0, v1, hidden.stride(0), hidden.stride(1),
                weight.stride(0), weight.stride(1), dl.stride(0), 1.0 / ctx.temperature,
                HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_ent is not None, **flags, **blocks,
            )
            dl = dl.to(dl_dtype)
            if need_h:
                w_op = weight[v0:v1].to(dl_dtype)
                if dh is None:
                    torch.mm(dl, w_op, out=grad_h)
                else:
                    dh = _addmm_fp32(dh, dl, w_op)
                del w_op
            if need_w:
                dw = grad_w[v0:v1]
                if dw.dtype == dl_dtype:
                    torch.mm(dl.T, h_op, out=dw)
                else:
                    dw.copy_(torch.mm(dl.T, h_op))
            del dl
        if dh is not None:
            grad_h = dh.to(hidden.dtype)
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
