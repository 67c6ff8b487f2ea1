"""SigLIP's sigmoid loss against open_clip's `SigLipLoss` and a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from clipsearch.clip.loss import sigmoid_loss


def test_matches_open_clip():
    torch.manual_seed(0)
    image_features, text_features = torch.randn(6, 16), torch.randn(6, 16)
    logit_scale, logit_bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    expected = SigLipLoss()(
        F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), logit_scale.exp(), logit_bias
    )
    got = sigmoid_loss(image_features, text_features, logit_scale, logit_bias)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_matches_hand_computation():
    features = torch.eye(2, dtype=torch.float64)  # matching pairs: cosine 1; the others: 0
    loss = sigmoid_loss(features, 2 * features, torch.tensor(0.0, dtype=torch.float64), torch.tensor(-1.0))
    positive, negative = 1.0 - 1.0, 0.0 - 1.0  # logits: scale 1 * cosine + bias -1

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = -(2 * log_sigmoid(positive) + 2 * log_sigmoid(-negative)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_gradients_reach_scale_and_bias():
    torch.manual_seed(1)
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    sigmoid_loss(torch.randn(4, 8), torch.randn(4, 8), scale, bias).backward()
    assert scale.grad is not None and bias.grad is not None
    assert bias.grad.item() < 0  # at bias -10 every pair says "no": the positives pull the bias up
