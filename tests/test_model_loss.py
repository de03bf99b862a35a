import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss

from engine.config import Settings
from engine.losses import JointLoss
from modules import SiameseNet, build_model
from train import build_optimizer
from utils import UserError


def test_forward_returns_embedding_and_one_logit_per_image():
    model = SiameseNet("resnet18", embedding_dim=16).eval()
    embedding, logit = model(torch.rand(3, 3, 32, 32))
    assert embedding.shape == (3, 16) and logit.shape == (3,)


def test_siamese_twins_share_one_set_of_weights():
    """Same image → same embedding; different images → different embeddings; one weight changed → both move."""
    torch.manual_seed(0)
    model = SiameseNet("resnet18", embedding_dim=8).eval()
    a, b = torch.rand(2, 3, 32, 32).unbind()
    with torch.no_grad():
        twins, _ = model(torch.stack([a, b, a]))
        assert torch.allclose(twins[0], twins[2], atol=1e-6)
        assert (twins[0] - twins[1]).abs().max() > 1e-3
        model.trunk.conv1.weight[0, 0, 0, 0] += 1.0  # one weight both twins go through
        moved, _ = model(torch.stack([a, b]))
    assert (moved[0] - twins[0]).abs().max() > 1e-4 and (moved[1] - twins[1]).abs().max() > 1e-4


def test_loss_is_weighted_bce_plus_pml_contrastive():
    torch.manual_seed(0)
    emb, logits = torch.randn(8, 4), torch.randn(8)
    y = torch.tensor([0, 1] * 4)
    loss, bce, cl, *_ = JointLoss(w_bce=0.7, w_cl=1.3)(emb, logits, y)
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    expected_cl = ContrastiveLoss(pos_margin=0, neg_margin=1, distance=LpDistance(p=2))(emb, y)
    assert bce == pytest.approx(expected_bce.item()) and cl == pytest.approx(expected_cl.item())
    assert loss.item() == pytest.approx(0.7 * expected_bce.item() + 1.3 * expected_cl.item(), rel=1e-6)


def test_contrastive_term_zero_when_classes_are_separated_and_positive_otherwise():
    y = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0], [1.0, 0], [-1.0, 0], [-1.0, 0]])  # normalised distance 2 > margin 1
    confident = torch.tensor([-20.0, -20.0, 20.0, 20.0])
    loss, bce, cl, *_ = JointLoss()(separated, confident, y)
    assert cl.item() == 0.0 and bce.item() < 1e-8
    mixed = torch.tensor([[1.0, 0], [-1.0, 0], [1.0, 0], [-1.0, 0]])  # each class spread, classes overlapping
    assert JointLoss()(mixed, confident, y)[2].item() > 0.5


def test_embeddings_are_l2_normalised_for_the_distance_by_default():
    y = torch.tensor([0, 1])
    near = torch.tensor([[10.0, 0.0], [10.0, 0.5]])  # far apart in raw units but at a small angle
    normalised = JointLoss()(near, torch.zeros(2), y)[2]
    raw = JointLoss(normalize_embeddings=False)(near, torch.zeros(2), y)[2]
    assert normalised.item() > 0.9 and raw.item() == pytest.approx(0.5, abs=1e-4)


def test_schedule_warms_up_then_decays_to_zero():
    model = torch.nn.Linear(2, 1)
    s = Settings(epochs=2, lr=0.1, warmup_epochs=0.5)
    optimizer, scheduler = build_optimizer(model, s, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[4] == pytest.approx(0.1) and lrs[-1] < 0.01 and scheduler.get_last_lr()[0] == pytest.approx(0)


def test_weight_decay_shrinks_weights_but_not_batchnorm_or_biases():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    s = Settings(epochs=1, lr=0.1, weight_decay=0.5, warmup_epochs=0)
    optimizer, _ = build_optimizer(model, s, steps_per_epoch=10)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: AdamW moves a parameter only by its decay, lr * wd * p
    optimizer.step()
    weight, bias, bn_weight, bn_bias = model.parameters()
    assert torch.allclose(weight, before[0] * (1 - 0.1 * 0.5))
    assert torch.equal(bias, before[1]) and torch.equal(bn_weight, before[2]) and torch.equal(bn_bias, before[3])


def test_imagenet_weights_offline_fail_with_one_clear_line(monkeypatch):
    import torchvision.models as models

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(models, "get_model", lambda name, weights=None: offline() if weights else models.resnet18())
    with pytest.raises(UserError, match="--weights none"):
        build_model(Settings(backbone="resnet18", weights="imagenet"))


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = build_model(Settings(backbone="resnet18", weights=str(tmp_path / "r18.pth"), embedding_dim=8))
    assert torch.equal(model.trunk.conv1.weight, reference.conv1.weight)
    assert model.normalize_input
    with pytest.raises(UserError, match="does not fit"):
        build_model(Settings(backbone="resnet34", weights=str(tmp_path / "r18.pth")))


def test_moving_average_follows_the_weights_in_a_short_run():
    from train import moving_average
    model = torch.nn.Linear(2, 1, bias=False)
    ema = moving_average(model, 0.999, total_steps=20)  # capped: a 0.999 average would stay at the first step
    for step in range(20):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update_parameters(model)
    assert ema.module.weight.mean().item() > 14  # follows the recent weights (plain 0.999 would give ~0.2)
    assert moving_average(model, 0.0, total_steps=20) is None
    with pytest.raises(UserError, match="between 0 and 1"):
        moving_average(model, 1.5, total_steps=20)
