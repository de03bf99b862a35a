"""Trunks from timm beside torchvision's ResNets: each trains, resumes exactly, predicts, exports and draws Grad-CAM;
weights come from a local file without pickle, and ImageNet weights offline end in one line."""
import copy
import shutil

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision

import driver
import export
import predict
import train
from conftest import TINY_FLAGS
from engine.checkpoints import load_checkpoint
from engine.config import Settings
from isic.demo import make_dataset
from modules import SiameseNet, build_model, sync_batchnorm
from reporting.explain import cell_offset, grad_cam, upsample_aligned
from utils import UserError
from workflow import pipeline

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

# Two small trunks of the ISIC winners' families, at the sizes the CPU profile uses; one run each serves every
# assertion below.
TRUNKS = {"efficientnet_b0": 64, "convnext_atto": 32}
SMALL = [flag for flag in TINY_FLAGS if flag not in ("--backbone", "resnet18", "--img-size", "32")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """80 synthetic images: 4 training steps an epoch."""
    root = tmp_path_factory.mktemp("trunk-data")
    return make_dataset(root / "data", n_images=80, malignant_rate=0.25, size=40, seed=1), root / "cache"


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """For each trunk: a 2-epoch run, and a copy of its folder as it stood after epoch 1, resumed from there. The
    resumed run stops once trained: evaluating it again would only repeat the whole run's evaluation."""
    root, made = tmp_path_factory.mktemp("trunks"), {}
    real_end, real_evaluate = train.end_of_epoch, pipeline.evaluate_run

    def trained_only(*args):
        raise UserError("trained; not evaluated again")

    def run_of(backbone):
        if backbone in made:
            return made[backbone]
        whole, resumed = root / f"{backbone}-whole", root / f"{backbone}-resumed"

        def keep_first_epoch(state, row, s, out_dir, plotted, writer):
            plotted = real_end(state, row, s, out_dir, plotted, writer)
            if row["epoch"] == 1:
                writer.wait()  # epoch 1's checkpoints are on disk, as a run killed now would leave them
                shutil.copytree(out_dir, resumed)
            return plotted
        train.end_of_epoch = keep_first_epoch
        try:
            assert driver.main(list(map(str, [
                "--data-dir", data[0], "--cache-dir", data[1], "--out", whole, "--backbone", backbone,
                "--img-size", TRUNKS[backbone], *SMALL, "--epochs", 2, "--workers", 0, "--no-tensorboard"]))) == 0
        finally:
            train.end_of_epoch = real_end
        assert load_checkpoint(resumed / "last.pt")["epoch"] == 1
        pipeline.evaluate_run = trained_only
        try:
            assert driver.main(["--resume", str(resumed)]) == 2
        finally:
            pipeline.evaluate_run = real_evaluate
        assert load_checkpoint(resumed / "last.pt")["epoch"] == 2
        made[backbone] = whole, resumed
        return made[backbone]
    return run_of


@pytest.fixture(scope="module")
def new_images(data, tmp_path_factory):
    """Four of the dataset's images in a folder, as predict.py --images takes them."""
    folder = tmp_path_factory.mktemp("new")
    for path in sorted(data[0].rglob("*.jpg"))[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("backbone", TRUNKS)
def test_timm_trunk_trains_and_resumes_exactly(runs, backbone):
    whole, resumed = runs(backbone)
    history = lambda run: pd.read_csv(run / "history.csv").drop(columns="seconds")  # noqa: E731
    pd.testing.assert_frame_equal(history(resumed), history(whole), check_exact=False, rtol=0, atol=1e-6)
    got, want = (load_checkpoint(run / "last.pt")["model"] for run in (resumed, whole))
    assert all(torch.allclose(got[k].float(), want[k].float(), rtol=0, atol=1e-6) for k in want)
    assert any(k.startswith("trunk.") for k in want) and load_checkpoint(whole / "best.pt")["settings"]["backbone"] \
        == backbone


@pytest.mark.slow
@pytest.mark.parametrize("backbone", TRUNKS)
def test_timm_trunk_predicts_exports_and_draws_grad_cam(runs, backbone, new_images, capsys):
    whole, _ = runs(backbone)
    assert (whole / "test" / "gallery.png").stat().st_size > 10_000  # Grad-CAM of the run's own test split
    assert predict.main(["--run", str(whole), "--images", str(new_images), "--out", str(whole / "new"),
                         "--workers", "0"]) == 0
    scored = pd.read_csv(whole / "new" / "predictions.csv")
    assert len(scored) == 4 and scored["probability"].between(0, 1).all()
    assert export.main(["--run", str(whole), "--check", "2"]) == 0
    assert "largest probability difference" in capsys.readouterr().out
    probabilities, embeddings = export.load_export(whole / "model.pt2")(torch.zeros(3, 3, 50, 70, dtype=torch.uint8))
    assert probabilities.shape == (3,) and embeddings.shape == (3, 16)


@pytest.mark.slow
def test_ensemble_of_members_with_different_trunks(runs, new_images, tmp_path):
    members = [str(runs(backbone)[0]) for backbone in TRUNKS]
    assert predict.main(["--run", *members, "--images", str(new_images), "--out", str(tmp_path / "e"),
                         "--workers", "0"]) == 0
    mean = pd.read_csv(tmp_path / "e" / "predictions.csv")["probability"].to_numpy()
    alone = [pd.read_csv(path)["probability"].to_numpy()
             for path in sorted((tmp_path / "e" / "members").glob("*/predictions.csv"))]
    assert len(alone) == 2 and len(mean) == 4 and abs(mean - (alone[0] + alone[1]) / 2).max() < 1e-6
    assert abs(alone[0] - alone[1]).max() > 1e-4  # two different networks


def test_torchvision_resnets_are_built_as_before():
    """resnet18/34/50 stay torchvision's: same weights for the same seed, same state-dict keys, ImageNet statistics."""
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    torch.manual_seed(3)
    model = SiameseNet("resnet18", embedding_dim=8)
    want = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    got = model.trunk.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_timm_trunk_has_no_classifier_and_its_own_statistics():
    model = build_model(Settings(backbone="test_convnext", embedding_dim=8, img_size=32))
    assert model.trunk.num_features == model.embedder[0].in_features == model.trunk(torch.zeros(1, 3, 32, 32)).shape[1]
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the config's, not ImageNet's: used with --weights only
    assert not model.normalize_input


def test_vit_is_built_for_the_runs_image_size_and_draws_grad_cam():
    """vit_tiny_patch16_224 takes 224 px images only; built for a 64 px run it takes 64 px ones (4 x 4 patches), and
    its Grad-CAM maps come from the patch tokens entering the last block (those leaving it get no gradient)."""
    torch.manual_seed(0)
    model = build_model(Settings(backbone="vit_tiny_patch16_224", embedding_dim=8, img_size=64)).eval()
    embedding, logit = model(torch.rand(2, 3, 64, 64))
    assert embedding.shape == (2, 8) and logit.shape == (2,)
    cams = grad_cam(model, torch.rand(2, 3, 64, 64))
    assert cams.shape == (2, 64, 64) and cams.flatten(1).amax(1).tolist() == pytest.approx([1.0, 1.0])
    assert float(cams.std()) > 0.01


def test_model_that_cannot_take_the_size_says_which_it_needs(monkeypatch):
    real = timm.create_model

    def fixed_only(name, **kwargs):  # a model whose constructor has no img_size, as some fixed-size ones
        if "img_size" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'img_size'")
        return real(name, **kwargs)
    monkeypatch.setattr(timm, "create_model", fixed_only)
    with pytest.raises(UserError, match=r"^test_vit takes only 160 px images: use --img-size 160$"):
        build_model(Settings(backbone="test_vit", img_size=32))
    assert build_model(Settings(backbone="test_vit", img_size=160, embedding_dim=8)) is not None


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded_without_pickle(tmp_path, suffix, monkeypatch):
    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", num_classes=10)  # with a classifier, as downloaded files are
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    model = build_model(Settings(backbone="test_efficientnet", weights=str(path), embedding_dim=8, img_size=32))
    assert all(loads) and (suffix == ".safetensors") == (not loads)  # no unpickling of arbitrary objects
    got = model.trunk.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items() if not k.startswith("classifier."))
    assert model.normalize_input and model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_trunk_of_a_runs_checkpoint_is_loaded(tmp_path):
    """best.pt of an earlier run starts a new one: its trunk's weights, without its embedder and head."""
    torch.manual_seed(2)
    earlier = SiameseNet("test_efficientnet", 8)
    torch.save({"model": earlier.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    model = build_model(Settings(backbone="test_efficientnet", weights=str(tmp_path / "best.pt"), embedding_dim=4))
    assert all(torch.equal(model.trunk.state_dict()[k], v) for k, v in earlier.trunk.state_dict().items())


def test_weights_file_that_does_not_fit_is_refused(tmp_path):
    state = timm.create_model("test_efficientnet", num_classes=0).state_dict()
    state.pop(next(k for k in state if k.endswith("running_var")))  # a buffer timm alone would leave at its default
    safetensors_torch.save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(UserError, match=r"short.safetensors does not fit this trunk: 1 missing and 0 unexpected"):
        build_model(Settings(backbone="test_efficientnet", weights=str(tmp_path / "short.safetensors")))


def test_imagenet_weights_offline_end_in_one_line_naming_weights_path(data, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # and an empty cache: nothing to find, nothing downloaded
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = ["--data-dir", str(data[0]), "--cache-dir", str(data[1]), "--out", str(tmp_path / "run"),
            "--backbone", "test_efficientnet", "--weights", "imagenet", *SMALL, "--epochs", "1", "--workers", "0"]
    assert driver.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not get ImageNet weights for test_efficientnet")
    assert "https://huggingface.co/timm/test_efficientnet.r160_in1k" in err[0] and "--weights PATH" in err[0]
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


def test_unknown_backbone_is_refused_in_one_line_before_anything_is_written(data, tmp_path, capsys):
    with pytest.raises(UserError, match=r"--backbone resnet5O is neither resnet18/34/50 nor a timm model"):
        build_model(Settings(backbone="resnet5O"))
    assert driver.main(["--data-dir", str(data[0]), "--out", str(tmp_path / "run"), "--backbone", "resnet5O"]) == 2
    assert capsys.readouterr().err.startswith("error: --backbone resnet5O is neither") and not (tmp_path / "run").exists()


def test_sync_batchnorm_keeps_timm_activations():
    """timm fuses the activation into BatchNormAct2d; PyTorch's converter would drop it and change the outputs."""
    torch.manual_seed(0)
    model = SiameseNet("test_efficientnet", embedding_dim=8).eval()
    images = torch.rand(2, 3, 32, 32)
    synced = sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    with torch.no_grad():
        assert torch.allclose(synced(images)[1], model(images)[1], atol=1e-6)


def test_grad_cam_cells_are_drawn_at_their_patch_centres():
    """A patchifying trunk (ConvNeXt: 4 x 4 stem of stride 4) centres cell i of a stride-s map on pixel
    s*i + (s - 1)/2, where align_corners=False interpolation puts it; an EfficientNet's on s*i, as a ResNet's."""
    convnext, efficientnet = (SiameseNet(name, 8).trunk for name in ("convnext_atto", "test_efficientnet"))
    assert (cell_offset(convnext, 16), cell_offset(efficientnet, 16)) == (7.5, 0.0)
    cam = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    drawn = F.interpolate(cam, size=64, mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(upsample_aligned(cam, 64, 16, cell_offset(convnext, 16)), drawn, atol=1e-5)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_convnext", "test_vit"])
def test_bf16_step_on_channels_last_is_finite_for_timm_trunks(backbone):
    """A training step as on a GPU (channels_last, bf16 autocast), here on the CPU: finite, near float32, and the
    embedding in float32 (the layers after the trunk run in full precision)."""
    torch.manual_seed(0)
    model = SiameseNet(backbone, 16, img_size=64).to(memory_format=torch.channels_last).train()
    images = torch.rand(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    losses = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            embedding, logit = model(images)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor([0.0, 1.0, 0.0, 1.0]))
        loss.backward()
        assert embedding.dtype == torch.float32 and torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
