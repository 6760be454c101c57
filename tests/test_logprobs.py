import math

import pytest
import torch

import longcot.kernels as K


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
