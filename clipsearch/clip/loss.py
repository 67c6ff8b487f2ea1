"""CLIP's contrastive training objective.

`clip_loss` is the special case of `multi_positive_loss` where pair i is the only match of image i
and of caption i; both run through one implementation, which leaves that case bit for bit the
plain symmetric cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_positive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """`clip_loss` for batches where a caption can be true of several images (and an image have
    several true captions): ``positives[i, j]`` (bool) says caption j describes image i, and every
    image and every caption needs at least one. Each image (caption) maximises the probability it
    gives to all its true matches together.

    A query-like caption ("a red circle") is true of about two other images in a batch of 64
    synthetic scenes; with `clip_loss` they are negatives, and the model learns to rank them below
    the one it was paired with: exactly what search by that query must not do.
    """
    logits_per_image = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    return (
        _matches_cross_entropy(logits_per_image, positives)
        + _matches_cross_entropy(logits_per_image.t(), positives.t())
    ) / 2


def _matches_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """The mean over rows of −log(the softmax probability of the row's true matches together).

    The matches' logits are folded into the place of the first one (their logsumexp there, −inf
    at the others), so plain cross-entropy against that place gives the sum of their
    probabilities: the normaliser is unchanged, since exp(logsumexp) is the sum of their exps.
    A row with one match is left exactly as it was (the logsumexp of one value is that value),
    which is what keeps `clip_loss` identical to cross-entropy against the diagonal.
    """
    first = positives.int().argmax(dim=1)
    together = logits.masked_fill(~positives, float("-inf")).logsumexp(dim=1, keepdim=True)
    folded = logits.masked_fill(positives, float("-inf")).scatter(1, first[:, None], together)
    return F.cross_entropy(folded, first)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the N×N cosine-similarity matrix of a batch of N pairs.

    Row i of each input belongs to pair i: every image has to pick out its own caption among
    the batch's captions, and every caption its own image; the loss is the mean of the two.

    ``logit_scale`` is the model's learned *log* temperature (``model.logit_scale``), not its
    exponential, so the call is ``clip_loss(img, txt, model.logit_scale)`` and gradients reach
    it. Features are L2-normalised here, so raw ``encode_image``/``encode_text`` outputs can be
    passed as they are.
    """
    pairs = torch.eye(image_features.shape[0], dtype=torch.bool, device=image_features.device)
    return multi_positive_loss(image_features, text_features, logit_scale, pairs)


def sigmoid_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over the N×N pairs of a batch of N (image, text) pairs.

    Each image–text pair is a binary question, "do these belong together?": yes on the
    diagonal, no everywhere else, each answered by ``sigmoid(logit_scale.exp() * cos +
    logit_bias)`` on its own; no softmax ties a row together. The loss is the negative
    log-likelihood of all N² answers, divided by N.

    As with `clip_loss`, ``logit_scale`` is the model's *log* temperature and the features are
    L2-normalised here: ``sigmoid_loss(img, txt, model.logit_scale, model.logit_bias)``.
    """
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.t() + logit_bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]
