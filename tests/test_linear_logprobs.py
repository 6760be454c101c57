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


def _compare(fn, hidden, weight, tokens, temperature, entropy, grads=("logp", "ent")):
    g_logp = torch.randn(tokens.shape) if "logp" in grads else None
    g_ent = torch.randn(tokens.shape) if "ent" in grads and entropy else None
    ref = _run(K.linear_token_logprobs_reference, hidden, weight, tokens, temperature, entropy,
               g_logp, g_ent)
    got = _run(fn, hidden, weight, tokens, temperature, entropy, g_logp, g_ent)
    assert got[0].dtype == torch.float32 and got[0].shape == tokens.shape
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=2e-5)
    if entropy:
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=2e-5)
    for g, r, x in zip(got[2:], ref[2:], (hidden, weight)):
        assert g.dtype == x.dtype
        if x.dtype == torch.float32:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
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
    _compare(K.linear_token_logprobs, hidden, weight, tokens, 0.7, entropy)


def test_triton_interpreter_one_row(triton_interpreter):
    hidden, weight, tokens = _inputs(1, 40, 16, torch.float32)
    _compare(K.linear_token_logprobs, hidden, weight, tokens, 1.0, True, grads=("logp",))
    out = K.linear_token_logprobs(hidden.requires_grad_(), weight, tokens)
    assert "Triton" in type(out.grad_fn).__name__
