import pytest
import torch

import longcot.kernels as K


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
