import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clipsearch.clip.loss import clip_loss


def _by_hand(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> float:
    """The loss written out with loops over the batch, from the paper's pseudo-code."""
    img = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in image_features.tolist()]
    txt = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in text_features.tolist()]
    n = len(img)
    logits = [[scale * sum(a * b for a, b in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]

    def cross_entropy(rows: list[list[float]]) -> float:
        return sum(math.log(sum(math.exp(v) for v in row)) - row[i] for i, row in enumerate(rows)) / n

    columns = [list(col) for col in zip(*logits)]
    return (cross_entropy(logits) + cross_entropy(columns)) / 2


def test_matches_hand_computation():
    torch.manual_seed(0)
    image_features = torch.randn(5, 8, dtype=torch.float64)
    text_features = torch.randn(5, 8, dtype=torch.float64)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)

    loss = clip_loss(image_features, text_features, logit_scale)

    assert loss.item() == pytest.approx(_by_hand(image_features, text_features, 1 / 0.07), rel=1e-12)


def test_two_pairs_in_closed_form():
    # Orthogonal unit features: the diagonal similarities are 1, the off-diagonal ones 0.
    features = torch.eye(2)
    loss = clip_loss(features * 3.0, features * 0.5, torch.tensor(0.0))  # scale e^0 = 1

    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-7)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_matches_open_clip(batch: int):
    torch.manual_seed(batch)
    image_features = torch.randn(batch, 32)
    text_features = torch.randn(batch, 32)
    logit_scale = torch.tensor(2.3)

    ours = clip_loss(image_features, text_features, logit_scale)
    reference = ClipLoss()(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), logit_scale.exp())

    assert (ours - reference).abs().item() <= 1e-6


def test_gradients_reach_features_and_logit_scale():
    torch.manual_seed(1)
    image_features = torch.randn(6, 16, requires_grad=True)
    text_features = torch.randn(6, 16, requires_grad=True)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    clip_loss(image_features, text_features, logit_scale).backward()

    for grad in (image_features.grad, text_features.grad, logit_scale.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_matched_pairs_score_lower_than_shuffled_ones():
    torch.manual_seed(2)
    features = torch.randn(8, 16)
    scale = torch.tensor(math.log(100.0))

    matched = clip_loss(features, features, scale)
    shuffled = clip_loss(features, features.roll(1, dims=0), scale)

    assert matched.item() < 0.01 < shuffled.item()
