import math

import pytest
import torch

import longcot.kernels as K
import longcot.kernels.logprobs as L
from conftest import kernels_backend


def test_hand_case_with_temperature():
    logits = torch.tensor([[2.0, 0.0, -2.0]])
    tokens = torch.tensor([0])
    t = 2.0
    z = [math.exp(v / t) for v in (2.0, 0.0, -2.0)]
    p = [v / sum(z) for v in z]
    logp, ent = K.token_logprobs(logits, tokens, temperature=t, return_entropy=True)
    assert logp.item() == pytest.approx(math.log(p[0]), rel=1e-6)
    assert ent.item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_output_for_any_input_dtype(dtype):
    logits = torch.randn(2, 5, 37).to(dtype)
    tokens = torch.randint(0, 37, (2, 5))
    logp = K.token_logprobs(logits, tokens)
    assert logp.dtype == torch.float32 and logp.shape == (2, 5)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logp, expected)


def test_entropy_extremes():
    v = 11
    uniform = torch.zeros(1, v)
    _, ent = K.token_logprobs(uniform, torch.tensor([3]), return_entropy=True)
    assert ent.item() == pytest.approx(math.log(v), rel=1e-6)
    peaked = torch.tensor([[0.0] + [-1e4] * (v - 1)])
    logp, ent = K.token_logprobs(peaked, torch.tensor([0]), return_entropy=True)
    assert logp.item() == pytest.approx(0.0, abs=1e-6) and ent.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_matches_finite_differences():
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([0, 6, 2])

    def f(x):
        logp, ent = K.token_logprobs(x, tokens, temperature=0.7, return_entropy=True)
        return logp.sum() + 0.3 * ent.sum()

    # The op computes in fp32; check the analytic fp32 gradient against fp64 differences.
    torch.autograd.gradcheck(lambda x: f(x).double(), (logits,), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_largest_token_id():
    logits = torch.randn(4, 1000)
    tokens = torch.full((4,), 999)
    torch.testing.assert_close(K.token_logprobs(logits, tokens), torch.log_softmax(logits, -1)[:, 999])


@pytest.mark.parametrize(
    "logits, tokens, temperature, match",
    [
        (torch.randn(2, 5), torch.tensor([0, 5]), 1.0, r"tokens: expected ids in \[0, 5\)"),
        (torch.randn(2, 5), torch.tensor([0, -1]), 1.0, r"tokens: expected ids in \[0, 5\)"),
        (torch.randn(2, 5), torch.tensor([0.0, 1.0]), 1.0, "tokens: expected an integer dtype"),
        (torch.randn(2, 5), torch.tensor([0, 1, 2]), 1.0, r"tokens: expected shape \(2,\)"),
        (torch.randn(2, 5), torch.tensor([0, 1]), 0.0, "temperature: expected a finite number > 0"),
        (torch.randn(2, 5), torch.tensor([0, 1]), float("inf"), "temperature"),
        (torch.randint(0, 3, (2, 5)), torch.tensor([0, 1]), 1.0, "logits: expected a floating"),
        (torch.randn(2, 0), torch.zeros(2, dtype=torch.long), 1.0, "logits: expected shape"),
    ],
)
def test_bad_input(logits, tokens, temperature, match):
    with pytest.raises(ValueError, match=match):
        K.token_logprobs(logits, tokens, temperature)


# --- fast paths against the reference ------------------------------------------------------


def _run(fn, logits, tokens, temperature, entropy, g_logp, g_ent):
    """Outputs and d logits of ``sum(g_logp * logp) [+ sum(g_ent * entropy)]``."""
    x = logits.detach().clone().requires_grad_()
    out = fn(x, tokens, temperature, entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp * g_logp).sum()
    if ent is not None and g_ent is not None:
        loss = loss + (ent * g_ent).sum()
    loss.backward()
    return logp, ent, x.grad


def _compare(fn, logits, tokens, temperature, entropy, g_ent=True):
    g_logp = torch.randn(tokens.shape)
    g_e = torch.randn(tokens.shape) if g_ent else None
    ref = _run(K.token_logprobs_reference, logits, tokens, temperature, entropy, g_logp, g_e)
    got = _run(fn, logits, tokens, temperature, entropy, g_logp, g_e)
    assert got[0].dtype == torch.float32 and got[0].shape == tokens.shape
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    if entropy:
        assert got[1].dtype == torch.float32
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    assert got[2].dtype == logits.dtype
    if logits.dtype == torch.float32:
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    else:  # the same fp32 gradient, rounded to nearest in the logits' dtype: one ulp apart
        torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=1e-2, atol=1e-3)
        # and without bias (a truncating cast shrinks every element)
        norm, ref_norm = got[2].float().norm(), ref[2].float().norm()
        assert abs(norm / ref_norm - 1) < 1e-3


def _inputs(shape, vocab, dtype):
    logits = (3 * torch.randn(*shape, vocab)).to(dtype)
    tokens = torch.randint(0, vocab, shape)
    tokens.view(-1)[0] = vocab - 1  # the largest token id
    return logits, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("entropy", [False, True])
def test_chunked_matches_reference(dtype, entropy):
    logits, tokens = _inputs((3, 4), 97, dtype)
    chunked = lambda x, t, temp, e: L.token_logprobs_chunked(x, t, temp, e, chunk_rows=5)  # noqa: E731
    _compare(chunked, logits, tokens, 0.7, entropy)
    _compare(chunked, logits, tokens, 1.0, entropy, g_ent=False)


def test_cpu_default_is_chunked_and_reference_is_forced(monkeypatch):
    logits, tokens = _inputs((6,), 50, torch.float32)
    logits.requires_grad_()
    # Logits that fit in one chunk take plain autograd; larger ones are chunked.
    assert "Chunked" not in type(K.token_logprobs(logits, tokens).grad_fn).__name__
    monkeypatch.setattr(L, "CHUNK_BYTES", 4 * 50 * 2)
    assert "Chunked" in type(K.token_logprobs(logits, tokens).grad_fn).__name__
    with kernels_backend("cpu"):
        assert "Chunked" in type(K.token_logprobs(logits, tokens).grad_fn).__name__
    with kernels_backend("reference"):
        assert "Chunked" not in type(K.token_logprobs(logits, tokens).grad_fn).__name__


def test_chunked_gradient_of_entropy_only():
    logits, tokens = _inputs((5,), 33, torch.float32)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    L.token_logprobs_chunked(x, tokens, 1.3, True, chunk_rows=2)[1].sum().backward()
    K.token_logprobs_reference(y, tokens, 1.3, True)[1].sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_triton_interpreter_matches_reference(triton_interpreter, dtype, entropy):
    # V = 150: three 64-wide blocks, the last one partial.
    logits, tokens = _inputs((2, 3), 150, dtype)
    _compare(K.token_logprobs, logits, tokens, 0.7, entropy)


def test_triton_interpreter_one_row_and_logp_only_gradient(triton_interpreter):
    logits, tokens = _inputs((1,), 70, torch.float32)
    _compare(K.token_logprobs, logits, tokens, 1.0, True, g_ent=False)
    assert "Triton" in type(K.token_logprobs(logits.requires_grad_(), tokens).grad_fn).__name__


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(L, "_INTERPRETED", False)
    with kernels_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]))
