import contextlib

import pytest
import torch

import longcot.kernels as K
import longcot.kernels.linear_logprobs as LL
from conftest import kernels_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_logits_path(dtype):
    hidden = torch.randn(6, 16).to(dtype)
    weight = torch.randn(50, 16).to(dtype)
    tokens = torch.randint(0, 50, (6,))
    logp, ent = K.linear_token_logprobs(hidden, weight, tokens, 0.7, return_entropy=True)
    ref_logp, ref_ent = K.token_logprobs(hidden.float() @ weight.float().T, tokens, 0.7, True)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(ent, ref_ent)


def test_gradients_flow_to_hidden_and_weight():
    hidden = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 13, (5,))
    logp = K.linear_token_logprobs(hidden, weight, tokens)
    logp.sum().backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = torch.log_softmax(h2 @ w2.T, -1).gather(-1, tokens[:, None]).sum()
    expected.backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "hidden, weight, tokens, match",
    [
        (torch.randn(4, 8, 2), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), "hidden: expected 2 dimensions"),
        (torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long), r"weight: expected shape \[V, 8\]"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long), r"tokens: expected shape \(4,\)"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.full((4,), 10), r"tokens: expected ids in \[0, 10\)"),
        (torch.randn(4, 8), torch.randn(0, 8), torch.zeros(4, dtype=torch.long), "weight: expected at least one"),
    ],
)
def test_bad_input(hidden, weight, tokens, match):
    with pytest.raises(ValueError, match=match):
        K.linear_token_logprobs(hidden, weight, tokens)


# --- fast paths against the reference ------------------------------------------------------


def _run(fn, hidden, weight, tokens, temperature, entropy, g_logp, g_ent):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, tokens, temperature, entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp * g_logp).sum() if g_logp is not None else 0.0
    if ent is not None and g_ent is not None:
        loss = loss + (ent * g_ent).sum()
    loss.backward()
    return logp, ent, h.grad, w.grad


def _dlogits_bounds(hidden, weight, tokens, temperature, entropy, g_logp, g_ent):
    """|d logits| @ |weight| and |d logits|.T @ |hidden| (d logits of the reference, in fp32):
    rounding every d logit to bf16 (to nearest, 2^-9 relative) moves d hidden and d weight by at
    most 2^-9 times these; the tests allow 2^-8 for the products' own accumulation order."""
    logits = (hidden.float() @ weight.float().T).requires_grad_()
    out = K.token_logprobs_reference(logits, tokens, temperature, entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp * g_logp).sum() if g_logp is not None else 0.0
    if ent is not None and g_ent is not None:
        loss = loss + (ent * g_ent).sum()
    loss.backward()
    a = logits.grad.abs()
    return a @ weight.float().abs(), a.T @ hidden.float().abs()


def _compare(fn, hidden, weight, tokens, temperature, entropy, grads=("logp", "ent"), bf16_dlogits=False):
    """``bf16_dlogits``: with 16-bit inputs the Triton backward holds d logits in bf16 for its
    tensor-core products, so its gradients are within 2^-8 |d logits| @ |operand| (plus the final
    rounding) of the fp32 reference's, not the fp32 gradient rounded once."""
    g_logp = torch.randn(tokens.shape) if "logp" in grads else None
    g_ent = torch.randn(tokens.shape) if "ent" in grads and entropy else None
    ref = _run(K.linear_token_logprobs_reference, hidden, weight, tokens, temperature, entropy,
               g_logp, g_ent)
    got = _run(fn, hidden, weight, tokens, temperature, entropy, g_logp, g_ent)
    assert got[0].dtype == torch.float32 and got[0].shape == tokens.shape
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=2e-5)
    if entropy:
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=2e-5)
    bounds = _dlogits_bounds(hidden, weight, tokens, temperature, entropy, g_logp, g_ent)
    for g, r, x, bound in zip(got[2:], ref[2:], (hidden, weight), bounds):
        assert g.dtype == x.dtype
        if x.dtype == torch.float32:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
        elif bf16_dlogits and hidden.dtype == weight.dtype:
            err = (g.float() - r.float()).abs()
            assert torch.all(err <= 2**-8 * bound + 1e-2 * r.float().abs() + 1e-3), err.max()
        else:  # the same fp32 gradient rounded once to bf16
            torch.testing.assert_close(g.float(), r.float(), rtol=1e-2, atol=1e-3)


def _inputs(n, vocab, dim, dtype):
    hidden = torch.randn(n, dim).to(dtype)
    weight = (torch.randn(vocab, dim) / dim**0.25).to(dtype)
    tokens = torch.randint(0, vocab, (n,))
    tokens[0] = vocab - 1  # the largest token id
    return hidden, weight, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_chunked_matches_reference(dtype, entropy):
    hidden, weight, tokens = _inputs(13, 101, 24, dtype)

    def chunked(*args):  # tiles of 5 rows x 30 vocabulary entries, both with a partial tail
        return LL.linear_token_logprobs_chunked(*args, chunk_rows=5, chunk_cols=30)

    _compare(chunked, hidden, weight, tokens, 0.7, entropy)
    _compare(chunked, hidden, weight, tokens, 1.0, entropy, grads=("logp",))
    if entropy:
        _compare(chunked, hidden, weight, tokens, 1.3, entropy, grads=("ent",))


def test_chunked_gradient_to_one_operand_only():
    hidden, weight, tokens = _inputs(7, 40, 8, torch.float32)
    w = weight.clone().requires_grad_()
    LL.linear_token_logprobs_chunked(hidden, w, tokens, 0.5, chunk_rows=3, chunk_cols=16).sum().backward()
    w_ref = weight.clone().requires_grad_()
    K.linear_token_logprobs_reference(hidden, w_ref, tokens, 0.5).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-5)


def test_chunked_no_tokens():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    logp, ent = K.linear_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), 0.7, True)
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == ent.shape == (0,)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and hidden.grad.shape == (0, 8)


def test_cpu_default_is_chunked(monkeypatch):
    hidden, weight, tokens = _inputs(4, 20, 8, torch.float32)
    hidden.requires_grad_()
    # Logits that fit in one tile take plain autograd; larger ones are tiled.
    assert "Chunked" not in type(K.linear_token_logprobs(hidden, weight, tokens).grad_fn).__name__
    monkeypatch.setattr(LL, "CHUNK_BYTES", 4 * 20 * 2)
    assert "Chunked" in type(K.linear_token_logprobs(hidden, weight, tokens).grad_fn).__name__
    with kernels_backend("reference"):
        assert "Chunked" not in type(K.linear_token_logprobs(hidden, weight, tokens).grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_triton_interpreter_matches_reference(triton_interpreter, dtype, entropy):
    # Interpreter blocks are 16 tokens x 32 vocabulary x 16 hidden: every dimension has a
    # partial tail block here.
    hidden, weight, tokens = _inputs(19, 75, 24, dtype)
    _compare(K.linear_token_logprobs, hidden, weight, tokens, 0.7, entropy, bf16_dlogits=True)


_MIXED = (torch.bfloat16, torch.float32)  # bf16 hidden states against an fp32 LM head


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, _MIXED],
                         ids=["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("entropy", [False, True])
def test_triton_interpreter_backward_over_vocabulary_chunks(triton_interpreter, monkeypatch, dtypes, entropy):
    # A d logits budget of two 32-column blocks: the backward makes 3 passes over V = 150
    # (64 + 64 + 22 columns), so d hidden sums over chunks and d weight is written a chunk at a time.
    n, vocab = 19, 150
    hidden, weight, tokens = _inputs(n, vocab, 24, dtypes[0])
    weight = weight.to(dtypes[1])
    dl_size = 2 if dtypes == (torch.bfloat16,) * 2 else 4
    monkeypatch.setattr(LL, "BWD_CHUNK_BYTES", n * dl_size * 64)
    assert LL._vocab_chunk(n, vocab, dl_size, 32) == 64
    _compare(K.linear_token_logprobs, hidden, weight, tokens, 0.7, entropy, bf16_dlogits=True)
    _compare(K.linear_token_logprobs, hidden, weight, tokens, 1.0, entropy, grads=("logp",), bf16_dlogits=True)
    if entropy:
        _compare(K.linear_token_logprobs, hidden, weight, tokens, 1.3, entropy, grads=("ent",),
                 bf16_dlogits=True)


@pytest.mark.parametrize("to", ["hidden", "weight"])
def test_triton_interpreter_gradient_to_one_operand(triton_interpreter, monkeypatch, to):
    hidden, weight, tokens = _inputs(7, 100, 16, torch.float32)
    monkeypatch.setattr(LL, "BWD_CHUNK_BYTES", 7 * 4 * 32)  # 4 chunks of 32 columns (the last 4)
    x = (hidden if to == "hidden" else weight).clone().requires_grad_()
    args = (x, weight) if to == "hidden" else (hidden, x)
    logp, ent = K.linear_token_logprobs(*args, tokens, 0.5, True)
    (logp.sum() + 0.3 * ent.sum()).backward()
    y = (hidden if to == "hidden" else weight).clone().requires_grad_()
    ref_args = (y, weight) if to == "hidden" else (hidden, y)
    ref_logp, ref_ent = K.linear_token_logprobs_reference(*ref_args, tokens, 0.5, True)
    (ref_logp.sum() + 0.3 * ref_ent.sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)


def test_triton_interpreter_no_tokens(triton_interpreter):
    hidden = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    logp, ent = K.linear_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), 0.7, True)
    assert "Triton" in type(logp.grad_fn).__name__
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and hidden.grad.shape == (0, 16)


def test_vocabulary_chunks_are_whole_blocks_within_the_budget(monkeypatch):
    # the realistic step: 16,384 tokens x V = 151,936 in bf16 (1 GiB of d logits per pass)
    assert LL._vocab_chunk(16_384, 151_936, 2, 128) == 32_768
    assert LL._vocab_chunk(16_384, 151_936, 4, 64) == 16_384
    assert LL._vocab_chunk(37, 50, 4, 64) == 50  # everything in one pass
    assert LL._vocab_chunk(1 << 30, 151_936, 2, 128) == 128  # at least one block
    monkeypatch.setattr(LL, "BWD_CHUNK_BYTES", 1000)
    assert LL._vocab_chunk(3, 500, 4, 32) == 64  # 83 columns fit: two whole blocks


@contextlib.contextmanager
def _allow_tf32(value: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_tf32_follows_torchs_fp32_matmul_flag():
    h32, hb = torch.empty(2, 2), torch.empty(2, 2, dtype=torch.bfloat16)
    with _allow_tf32(False):
        assert LL._ieee(h32, h32) and LL._ieee(hb, h32) and not LL._ieee(hb, hb)
    with _allow_tf32(True):
        assert not LL._ieee(h32, h32) and not LL._ieee(hb, h32) and not LL._ieee(hb, hb)
    # the tiles follow the precision: TF32 takes tensor-core tiles, IEEE fp32 the FMA ones
    assert LL._launch_config(h32, h32, True, False, ieee=False) != LL._launch_config(h32, h32, True, False, ieee=True)


def _float64_reference(hidden, weight, tokens, temperature, entropy):
    logp_all = torch.log_softmax(hidden @ weight.T / temperature, -1)
    return logp_all.gather(-1, tokens[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_fp32_precision_against_float64(compiled_triton, tf32):
    """fp32 inputs on a GPU: IEEE fp32 dots by default, TF32 tensor-core dots (and cuBLAS TF32
    products) with torch.backends.cuda.matmul.allow_tf32. Tolerances against float64, TF32 as
    emulated on the CPU at these sizes (H = 4,096, logits of std 4, T = 0.7): logp and entropy
    within 6e-3 with the operands rounded to TF32, 3.2e-2 truncated; gradients within 1.2e-3
    (rounded) and 1.9e-3 (truncated) of their largest value."""
    n, vocab, dim = 512, 32_000, 4096
    hidden = torch.randn(n, dim, device="cuda")
    weight = torch.randn(vocab, dim, device="cuda") * 4 / dim**0.5
    tokens = torch.randint(0, vocab, (n,), device="cuda")
    g_logp, g_ent = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")

    def run(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        logp, ent = fn(h, w, tokens, 0.7, True)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp.detach().double(), ent.detach().double(), h.grad.double(), w.grad.double()

    with _allow_tf32(tf32):
        got = run(K.linear_token_logprobs, hidden, weight)
    ref = run(_float64_reference, hidden.double(), weight.double())
    out_tol, grad_tol = (5e-2, 5e-3) if tf32 else (1e-4, 1e-4)
    for name, a, b in zip(("logp", "entropy"), got[:2], ref[:2]):
        assert (a - b).abs().max() < out_tol, name
    for name, a, b in zip(("d hidden", "d weight"), got[2:], ref[2:]):
        assert (a - b).abs().max() / b.abs().max() < grad_tol, name


def test_triton_interpreter_one_row(triton_interpreter):
    hidden, weight, tokens = _inputs(1, 40, 16, torch.float32)
    _compare(K.linear_token_logprobs, hidden, weight, tokens, 1.0, True, grads=("logp",))
    out = K.linear_token_logprobs(hidden.requires_grad_(), weight, tokens)
    assert "Triton" in type(out.grad_fn).__name__
