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
