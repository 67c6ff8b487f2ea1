"""CLIP's contrastive training objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the N×N cosine-similarity matrix of a batch of N pairs.

    Row i of each input belongs to pair i: every image has to pick out its own caption among
    the batch's captions, and every caption its own image; the loss is the mean of the two.

    ``logit_scale`` is the model's learned *log* temperature (``model.logit_scale``), not its
    exponential, so the call is ``clip_loss(img, txt, model.logit_scale)`` and gradients reach
    it. Features are L2-normalised here, so raw ``encode_image``/``encode_text`` outputs can be
    passed as they are.
    """
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits_per_image = logit_scale.exp() * image_features @ text_features.t()
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2


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
