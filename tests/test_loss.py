import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clipsearch.clip.loss import clip_loss, multi_positive_loss


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


def _clip_loss_before_multi_positive(image_features, text_features, logit_scale):
    """`clip_loss` as written before it became a case of `multi_positive_loss`: the diagonal as
    cross-entropy labels."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _random_batch(seed: int, batch: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    image_features = torch.randn(batch, 64, generator=generator, dtype=dtype, requires_grad=True)
    text_features = torch.randn(batch, 64, generator=generator, dtype=dtype, requires_grad=True)
    logit_scale = torch.tensor(4.6 * torch.rand(1, generator=generator).item(), dtype=dtype, requires_grad=True)
    return image_features, text_features, logit_scale


@pytest.mark.parametrize("batch", [1, 2, 7, 64, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_loss_and_its_gradients_are_bit_for_bit_the_plain_cross_entropy(batch: int, dtype: torch.dtype):
    inputs = _random_batch(batch, batch, dtype)
    expected = _clip_loss_before_multi_positive(*inputs)
    expected_gradients = torch.autograd.grad(expected, inputs)

    for loss in (clip_loss(*inputs), multi_positive_loss(*inputs, torch.eye(batch, dtype=torch.bool))):
        assert torch.equal(loss, expected)
        gradients = torch.autograd.grad(loss, inputs)
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(gradients, expected_gradients))


def _multi_positive_by_hand(image_features, text_features, scale: float, positives) -> float:
    """−log of the softmax probability of all true matches together, each direction, in float64."""
    logits = scale * F.normalize(image_features.double(), dim=-1) @ F.normalize(text_features.double(), dim=-1).t()

    def direction(rows: torch.Tensor, matches: torch.Tensor) -> float:
        probabilities = rows.softmax(dim=1)
        return -sum(math.log(probabilities[i][matches[i]].sum().item()) for i in range(len(rows))) / len(rows)

    return (direction(logits, positives) + direction(logits.t(), positives.t())) / 2


def test_multi_positive_loss_counts_every_true_match():
    image_features, text_features, logit_scale = _random_batch(3, 16)
    positives = torch.rand(16, 16, generator=torch.Generator().manual_seed(4)) < 0.2
    positives |= torch.eye(16, dtype=torch.bool)
    assert positives.sum() > 16  # some images have several true captions, some captions several images

    loss = multi_positive_loss(image_features, text_features, logit_scale, positives)

    expected = _multi_positive_by_hand(image_features, text_features, logit_scale.exp().item(), positives)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_multi_positive_loss_spares_a_caption_true_of_two_images():
    torch.manual_seed(0)
    images, texts, scale = torch.randn(6, 16), torch.randn(6, 16), torch.tensor(3.0)
    # Image 1 is a copy of image 0, and caption 0 is true of both: only counting it as a match
    # stops the loss from asking the model to tell the two apart.
    images[1] = images[0]
    both = torch.eye(6, dtype=torch.bool)
    both[1, 0] = True
    assert multi_positive_loss(images, texts, scale, both) < clip_loss(images, texts, scale)


def test_a_batch_of_only_true_pairs_has_zero_loss_and_finite_zero_gradients():
    # Two identical images both described by both captions: the loss cannot tell which caption
    # is whose, so its gradient must not prefer either arrangement.
    image_features = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    text_features = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    everything = torch.ones(2, 2, dtype=torch.bool)

    loss = multi_positive_loss(image_features, text_features, torch.tensor(2.0), everything)
    loss.backward()

    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # all probability is on true matches
    assert torch.isfinite(image_features.grad).all()
    assert image_features.grad.abs().max().item() == pytest.approx(0.0, abs=1e-7)
