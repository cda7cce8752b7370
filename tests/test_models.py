"""Backbones by name and the ImageClassifier LightningModule."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torchvision
from lightning.pytorch import Trainer
from torch import nn

from sp_lightning.data import ShapesDataModule
from sp_lightning.models import ImageClassifier, SmallCNN, build_backbone


@pytest.mark.parametrize(
    ("spec", "kwargs", "small_input"),
    [
        ("small_cnn", {"widths": [8, 16]}, False),
        ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, False),
        ("timm:resnet18", {}, True),
        ("torchvision:resnet18", {}, True),
    ],
)
def test_backbones_by_name_output_one_logit_per_class(spec: str, kwargs: dict, small_input: bool) -> None:
    model = build_backbone(spec, 7, small_input=small_input, kwargs=kwargs)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_small_input_gives_resnet_stems_stride_one() -> None:
    plain = build_backbone("torchvision:resnet18", 5)
    small = build_backbone("torchvision:resnet18", 5, small_input=True)
    assert plain.conv1.stride == (2, 2) and isinstance(plain.maxpool, nn.MaxPool2d)
    assert small.conv1.stride == (1, 1) and small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    features = {}
    for name, model in (("plain", plain), ("small", small)):
        model.layer4.register_forward_hook(lambda m, i, o, name=name: features.__setitem__(name, o))
        model.eval()(torch.randn(1, 3, 32, 32))
    assert features["plain"].shape[-1] == 1 and features["small"].shape[-1] == 4  # 32 / 8 instead of 32 / 32
    with pytest.raises(ValueError, match="img_size"):
        build_backbone("timm:vit_tiny_patch16_224", 5, small_input=True, kwargs={"img_size": 32, "depth": 1})


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("resnet18", "timm:<name>"),
        ("timm:not_a_model", "timm.list_models"),
        ("torchvision:not_a_model", "torchvision.models.list_models"),
        ("torchvision:", "torchvision:<name>"),
    ],
)
def test_unknown_backbones_are_explained(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone(spec, 3)


def test_small_cnn_has_no_pretrained_weights() -> None:
    with pytest.raises(ValueError, match="pretrained=False"):
        build_backbone("small_cnn", 3, pretrained=True)
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(3, widths=[])


def test_timm_pretrained_without_network_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"timm:resnet10t.*cannot reach the weights.*pretrained=False") as info:
        build_backbone("timm:resnet10t", 3, pretrained=True)
    assert isinstance(info.value.__cause__, OSError)


def test_torchvision_pretrained_without_network_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(RuntimeError, match=r"torchvision:mobilenet_v3_small.*cannot reach.*pretrained=False"):
        build_backbone("torchvision:mobilenet_v3_small", 3, pretrained=True)


def test_torchvision_pretrained_loads_cached_weights_and_resizes_the_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A weights file in the torch hub cache is what pretrained=True loads (no network involved).
    reference = torchvision.models.mobilenet_v3_small(num_classes=1000)
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / Path(url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_backbone("torchvision:mobilenet_v3_small", 4, pretrained=True)
    torch.testing.assert_close(model.features[0][0].weight, reference.features[0][0].weight)
    assert model.classifier[-1].out_features == 4
    assert model.classifier[-1].in_features == reference.classifier[-1].in_features
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def _classifier(**kwargs: object) -> ImageClassifier:
    return ImageClassifier(6, backbone_kwargs={"widths": [8, 16]}, **kwargs)


def test_classifier_validates_its_options() -> None:
    for kwargs, match in (
        ({"optimizer": "adam"}, "optimizer"),
        ({"scheduler": "step"}, "scheduler"),
        ({"lr": 0.0}, "lr > 0"),
        ({"momentum": 1.0}, "momentum"),
    ):
        with pytest.raises(ValueError, match=match):
            _classifier(**kwargs)
    with pytest.raises(TypeError, match=r"\(images, labels, \.\.\.\)"):
        _classifier().training_step(torch.zeros(2, 3, 16, 16), 0)


def _tiny_trainer(tmp_path: Path, epochs: int = 1) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_classifier_trains_on_masked_batches_and_logs_loss_and_accuracy(tmp_path: Path) -> None:
    dm = ShapesDataModule(image_size=32, train_size=32, val_size=16, test_size=16, batch_size=8)
    model = _classifier(optimizer="sgd", lr=0.05, scheduler="cosine")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _tiny_trainer(tmp_path, epochs=2)
    trainer.fit(model, dm)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in logged and torch.isfinite(logged[key])
    assert 0.0 <= float(logged["val/acc"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["nesterov"]
    # cosine over the 8 steps of the run: the learning rate has decayed to 0 at the end
    assert trainer.global_step == 8 and optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    result = trainer.test(model, dm, verbose=False)[0]
    assert set(result) == {"test/loss", "test/acc"}
    probabilities = model.predict_step(next(iter(dm.test_dataloader())), 0)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(8))


def test_classifier_accuracy_is_plain_accuracy(tmp_path: Path) -> None:
    dm = ShapesDataModule(image_size=32, train_size=8, val_size=12, test_size=12, batch_size=12)
    model = _classifier()
    trainer = _tiny_trainer(tmp_path)
    acc = trainer.validate(model, dm, verbose=False)[0]["val/acc"]
    images, labels, _ = next(iter(dm.val_dataloader()))
    model.eval()
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).float().mean()
    assert acc == pytest.approx(float(expected))


def test_adamw_is_the_default_optimizer(tmp_path: Path) -> None:
    model = _classifier(lr=0.01, weight_decay=0.2)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 0.01 and optimizer.param_groups[0]["weight_decay"] == 0.2
    assert model.hparams.backbone == "small_cnn" and model.hparams.num_classes == 6
