"""The loss: L = w_bce * BCEWithLogits on the head's logit + w_cl * ContrastiveLoss on the embedding."""
from __future__ import annotations

from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss
from torch import nn


class JointLoss(nn.Module):
    """L = w_bce * BCEWithLogits(logit, y) + w_cl * ContrastiveLoss(embeddings, y), pairs formed within the batch
    (under torchrun: within each process's batch, as on one GPU with that batch size)."""

    def __init__(self, w_bce=1.0, w_cl=1.0, pos_margin=0.0, neg_margin=1.0, normalize_embeddings=True):
        super().__init__()
        self.w_bce, self.w_cl = w_bce, w_cl
        self.bce = nn.BCEWithLogitsLoss()
        self.contrastive = ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin,
                                           distance=LpDistance(p=2, power=1, normalize_embeddings=normalize_embeddings))

    def forward(self, embeddings, logits, targets):
        bce = self.bce(logits.float(), targets.float())
        contrastive = self.contrastive(embeddings.float(), targets.long())
        return self.w_bce * bce + self.w_cl * contrastive, bce.detach(), contrastive.detach()


def build_loss(s) -> JointLoss:
    return JointLoss(s.w_bce, s.w_cl, s.pos_margin, s.neg_margin, s.normalize_embeddings)
