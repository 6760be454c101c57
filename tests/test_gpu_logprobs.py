"""The compiled Triton log-prob kernels against the reference at real sizes (CUDA only).

Skipped without a CUDA device; run with `pytest -m gpu tests/test_gpu_logprobs.py` on a GPU
machine (TRITON_INTERPRET unset, so the kernels are compiled).
"""

import pytest
import torch

import longcot.kernels as K

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("compiled_triton"),
]

VOCAB = 151_936


def _grads(fn, inputs, tokens, temperature, g_logp, g_ent):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    logp, ent = fn(*leaves, tokens, temperature, True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), [x.grad for x in leaves]


def _close(got, ref, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=what)
    else:  # bf16 outputs or bf16 products: relative to the tensor's scale
        scale = ref.float().abs().max().clamp_min(1e-6)
        err = (got.float() - ref.float()).abs().max() / scale
        assert err < 2e-2, f"{what}: max error {err:.3g} of the largest value"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_real_size(dtype):
    n = 4096
    logits = (3 * torch.randn(n, VOCAB, device="cuda")).to(dtype)
    tokens = torch.randint(0, VOCAB, (n,), device="cuda")
    tokens[0] = VOCAB - 1
    g_logp, g_ent = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    got = _grads(K.token_logprobs, [logits], tokens, 0.7, g_logp, g_ent)
    ref = _grads(K.token_logprobs_reference, [logits], tokens, 0.7, g_logp, g_ent)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=2e-5)
    _close(got[2][0], ref[2][0], dtype, "d logits")


def test_token_logprobs_int64_offsets():
    # 14,200 x 151,936 = 2.16e9 elements > 2^31: rows past the int32 range must be right.
    n = 14_200
    assert n * VOCAB > 2**31
    logits = torch.randn(n, VOCAB, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (n,), device="cuda")
    tokens[-1] = VOCAB - 1
    x = logits.requires_grad_()
    logp, ent = K.token_logprobs(x, tokens, 0.7, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    tail = slice(n - 64, n)
    y = logits[tail].detach().clone().requires_grad_()
    ref_logp, ref_ent = K.token_logprobs_reference(y, tokens[tail], 0.7, True)
    (ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(logp[tail].detach(), ref_logp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent[tail].detach(), ref_ent, rtol=1e-5, atol=2e-5)
    _close(x.grad[tail], y.grad, torch.bfloat16, "d logits past 2^31")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logprobs_real_size(dtype):
    n, dim = 4096, 896
    hidden = torch.randn(n, dim, device="cuda").to(dtype)
    weight = (torch.randn(VOCAB, dim, device="cuda") / dim**0.5).to(dtype)
    tokens = torch.randint(0, VOCAB, (n,), device="cuda")
    tokens[0] = VOCAB - 1
    g_logp, g_ent = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    got = _grads(K.linear_token_logprobs, [hidden, weight], tokens, 0.7, g_logp, g_ent)
    ref = _grads(K.linear_token_logprobs_reference, [hidden, weight], tokens, 0.7, g_logp, g_ent)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 2e-3}
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    _close(got[2][0], ref[2][0], dtype, "d hidden")
    _close(got[2][1], ref[2][1], dtype, "d weight")


def test_linear_token_logprobs_int64_offsets():
    # weight of 151,936 x 14,336 = 2.18e9 elements > 2^31.
    n, dim = 128, 14_336
    assert VOCAB * dim > 2**31
    hidden = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(VOCAB, dim, device="cuda") / dim**0.5).to(torch.bfloat16)
    tokens = torch.randint(VOCAB - 1000, VOCAB, (n,), device="cuda")
    g_logp, g_ent = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    got = _grads(K.linear_token_logprobs, [hidden, weight], tokens, 1.0, g_logp, g_ent)
    ref = _grads(K.linear_token_logprobs_reference, [hidden, weight], tokens, 1.0, g_logp, g_ent)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-3, atol=2e-3)
    _close(got[2][0], ref[2][0], torch.bfloat16, "d hidden")
    _close(got[2][1][-1000:], ref[2][1][-1000:], torch.bfloat16, "d weight, last rows")
