"""The loss: L = w_bce * BCEWithLogits on the head's logit + w_cl * ContrastiveLoss on the embedding
+ w_instance * NT-Xent between two augmented views of each training image."""
from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory, NTXentLoss, SelfSupervisedLoss
from pytorch_metric_learning.miners import BatchHardMiner, MultiSimilarityMiner
from torch import nn

from utils import UserError

MINERS = {"none": None, "multisimilarity": MultiSimilarityMiner, "batchhard": BatchHardMiner}
# What pair_stats returns, summed over batches by train_one_epoch: counts and distance sums, not ratios, so that the
# epoch's fractions and means weigh every pair once (and sum across torchrun ranks).
PAIR_STATS = ("pos_pairs", "pos_active", "pos_distance_sum", "neg_pairs", "neg_active", "neg_distance_sum")


@torch.no_grad()
def pair_stats(distances: torch.Tensor, labels: torch.Tensor, pos_margin: float, neg_margin: float) -> torch.Tensor:
    """Counts behind the contrastive loss of one batch, as a float tensor in PAIR_STATS order.

    Over every ordered in-batch pair (i != j): positive when the pair labels agree. A pair is active when its loss is
    non-zero: a positive farther apart than pos_margin, a negative closer than neg_margin. The library's default
    reducer averages the active pairs only, so the loss value alone cannot show that fewer of them remain.
    """
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    neg = ~same
    return torch.stack([pos.sum(), (pos & (distances > pos_margin)).sum(), distances[pos].sum(),
                        neg.sum(), (neg & (distances < neg_margin)).sum(), distances[neg].sum()]).float()


def epoch_pair_stats(sums) -> dict:
    """Summed PAIR_STATS → the epoch's active fractions and mean distances (NaN where there was no such pair)."""
    s = dict(zip(PAIR_STATS, (float(v) for v in sums)))
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"train_pos_active": ratio(s["pos_active"], s["pos_pairs"]),
            "train_neg_active": ratio(s["neg_active"], s["neg_pairs"]),
            "train_pos_distance": ratio(s["pos_distance_sum"], s["pos_pairs"]),
            "train_neg_distance": ratio(s["neg_distance_sum"], s["neg_pairs"])}


class Memory(CrossBatchMemory):
    """CrossBatchMemory whose queue position travels in state_dict with the stored embeddings and labels (buffers),
    so that a resumed run continues with the very memory the interrupted one had."""

    def get_extra_state(self):
        return {"queue_idx": int(self.queue_idx), "has_been_filled": bool(self.has_been_filled)}

    def set_extra_state(self, state):
        self.queue_idx, self.has_been_filled = state["queue_idx"], state["has_been_filled"]


class JointLoss(nn.Module):
    """L = w_bce * BCEWithLogits(logit, y) + w_cl * ContrastiveLoss(embeddings, pair labels), pairs formed within the
    batch (under torchrun: within each process's batch, as on one GPU with that batch size).

    Pair labels default to the binary target; with --pair-labels diagnosis they are diagnosis codes while the BCE
    term keeps the target. For embeddings that are learned from (requires_grad: a training step), optional extras:
    a pair miner (only the pairs it picks count) and a cross-batch memory of the last `memory_size` training
    embeddings, which every batch is paired against (under torchrun each rank keeps its own). Otherwise (the
    validation loss, under inference_mode) the contrastive term is the plain in-batch one for every variant:
    validation losses stay comparable and validation embeddings never enter the memory.

    The instance term (w_instance > 0, given `second_view`: the embeddings of a second augmented view of the same
    images, row for row) is NT-Xent over the views: each image's two views are the positive pair, every other image's
    views of the batch the negatives (under torchrun: of the process's own batch), whatever their class. It keeps
    apart lesions that the class term alone would pull to one point. Without a second view (validation) it is 0.

    Returns (loss, bce, contrastive, pair_stats, instance): all but loss detached; pair_stats as in `pair_stats`.
    """

    def __init__(self, w_bce=1.0, w_cl=1.0, pos_margin=0.0, neg_margin=1.0, normalize_embeddings=True,
                 miner="none", memory_size=0, embedding_dim=None, w_instance=0.0, temperature=0.1):
        super().__init__()
        self.w_bce, self.w_cl, self.w_instance = w_bce, w_cl, w_instance
        self.instance = SelfSupervisedLoss(NTXentLoss(temperature=temperature), symmetric=True)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.bce = nn.BCEWithLogitsLoss()
        self.contrastive = ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin,
                                           distance=LpDistance(p=2, power=1, normalize_embeddings=normalize_embeddings))
        # The miners pick pairs by the distance the loss measures (their defaults: cosine similarity, normalised L2).
        self.miner = MINERS[miner](distance=self.contrastive.distance) if MINERS[miner] else None
        self.memory = None
        if memory_size:
            self.memory = Memory(self.contrastive, embedding_dim, memory_size, miner=self.miner)

    def forward(self, embeddings, logits, targets, pair_labels=None, second_view=None):
        learning = embeddings.requires_grad
        embeddings = embeddings.float()
        labels = targets.long() if pair_labels is None else pair_labels.long()
        bce = self.bce(logits.float(), targets.float())
        if self.memory is not None and learning:
            contrastive = self.memory(embeddings, labels)
        elif self.miner is not None and learning:
            contrastive = self.contrastive(embeddings, labels, self.miner(embeddings, labels))
        else:
            contrastive = self.contrastive(embeddings, labels)
        loss = self.w_bce * bce + self.w_cl * contrastive
        instance = torch.zeros((), device=embeddings.device)
        if second_view is not None:
            instance = self.instance(embeddings, second_view.float())
            loss = loss + self.w_instance * instance
        with torch.no_grad():
            stats = pair_stats(self.contrastive.distance(embeddings), labels, self.pos_margin, self.neg_margin)
        return loss, bce.detach(), contrastive.detach(), stats, instance.detach()


def build_loss(s) -> JointLoss:
    if s.xbm and s.xbm < s.batch_size:
        raise UserError(f"--xbm {s.xbm} is smaller than --batch-size {s.batch_size}: the memory holds at least the "
                        f"current batch")
    return JointLoss(s.w_bce, s.w_cl, s.pos_margin, s.neg_margin, s.normalize_embeddings, s.miner, s.xbm,
                     s.embedding_dim, s.w_instance, s.instance_temperature)
