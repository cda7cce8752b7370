"""``SemanticPullbackCallback(explainers=...)``: other explainers (a callable, Captum's) as extra tiles; the model restored."""

from __future__ import annotations

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from captum.attr import IntegratedGradients, LayerGradCam

from callback_support import (  # noqa: F401  (one_thread is a fixture)
    CLASS_NAMES, BlobData, TinyClassifier, blob_images, one_thread, trainer_kwargs,
)
from sp_lightning import SemanticPullbackCallback
from sp_lightning.engine import SoftRules
from sp_lightning.explainers import Gradient, as_explainer
from sp_lightning.probe.explain import ExplainSettings, explain_probe, merge_shards
from test_callback_logging import record_panels

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:No logger of this run shows images"),
    pytest.mark.filterwarnings("ignore::UserWarning:captum.*"),
]


def input_times_gradient(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A user's own explainer: (model, inputs, target) -> attribution."""
    inputs = inputs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(inputs).gather(1, target[:, None]).sum(), inputs)
    return inputs.detach() * grad


def extra_explainers(module: TinyClassifier) -> dict:
    return {
        "IG": IntegratedGradients(module),
        "GradCAM": LayerGradCam(module, module.model.features[4]),  # the last conv: a coarse 8x8 map
        "x*grad": input_times_gradient,
    }


def settings(explainers: tuple = ()) -> ExplainSettings:
    bounds = (torch.full((3,), -2.0), torch.full((3,), 2.0))
    return ExplainSettings(top_k=1, gradient=True, counterfactual=False, ascent_steps=1, alpha=0.1, bounds=bounds,
                           rules=SoftRules.create(None), logits_fn=None, reduction="mean", metrics=(), seed=0,
                           explainers=explainers)


def test_extra_explainers_are_tiles_after_the_gradient_drawn_like_the_soft_pullback(tmp_path, monkeypatch) -> None:
    drawn = record_panels(monkeypatch)
    module = TinyClassifier()
    callback = SemanticPullbackCallback(num_images=2, top_k=1, counterfactual=False, every_n_epochs=None,
                                        explainers=extra_explainers(module), on_error="raise")
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=BlobData())  # the Captum attributions are built on this module
    (frame,) = drawn.frames
    maps = frame.explanations.explainer_maps
    assert frame.explainer_names == ("IG", "GradCAM", "x*grad") and maps.shape == (2, 3, 16, 16)
    assert bool(torch.isfinite(maps).all()) and bool((maps.flatten(2).std(dim=2) > 0).all())
    for i in range(2):
        true_name = CLASS_NAMES[int(callback.probe.labels[i])]
        _, captions = drawn.probe(i)
        names = [caption[0] for caption in captions]
        assert names == ["input", f"SP: {true_name}", f"SP: {names[2][4:]}", f"grad: {true_name}",
                         f"IG: {true_name}", f"GradCAM: {true_name}", f"x*grad: {true_name}"]
        assert captions[4][1] == captions[1][1]  # the same probability line as the SP toward the true class
    assert trainer.global_step == 4


def hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


def test_extra_explainers_leave_the_model_as_it_was_and_match_the_callable() -> None:
    module = TinyClassifier().train()
    images, labels = blob_images(4)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    result = explain_probe(module, images, labels, settings(tuple(extra_explainers(module).items())))
    assert all(m.training for m in module.modules()) and hooks(module) == 0
    assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    module.eval()
    expected = input_times_gradient(module, images, labels).mean(dim=1)
    assert torch.allclose(result.explainer_maps[:, 2], expected, atol=1e-6)
    # merged across two ranks' shards in probe order, like every other field
    shards = [explain_probe(module, images[r::2], labels[r::2], settings((("x*grad", input_times_gradient),)))
              for r in range(2)]
    assert torch.allclose(merge_shards(shards, 2).explainer_maps[:, 0], expected, atol=1e-6)


def test_coarse_maps_are_upsampled_and_wrong_shapes_are_named() -> None:
    module = TinyClassifier().eval()
    images, labels = blob_images(2)
    cam = as_explainer(LayerGradCam(module, module.model.features[4]), module).attribute(images, labels)
    assert cam.shape == images.shape and torch.equal(cam[:, 0], cam[:, 2])  # one map, every channel
    assert torch.equal(as_explainer(Gradient(module), module).attribute(images, labels),
                       Gradient(module).attribute(images, labels))
    with pytest.raises(ValueError, match=r"shape \(2, 5\), which does not fit inputs"):
        as_explainer(lambda m, x, t: torch.ones(2, 5), module).attribute(images, labels)
    with pytest.raises(ValueError, match="explains a different model"):
        as_explainer(Gradient(TinyClassifier()), module)


@pytest.mark.parametrize(
    ("explainers", "message"),
    [("IG", "must be a dict of name -> explainer"), ({"a": 3}, r"explainers\['a'\] must be a callable"),
     ({"": input_times_gradient}, "non-empty strings")],
)
def test_bad_explainers_are_refused_with_the_fix(explainers, message) -> None:
    with pytest.raises(TypeError, match=message):
        SemanticPullbackCallback(explainers=explainers)


def test_captum_is_imported_only_when_used() -> None:
    code = ("import sys, sp_lightning, sp_lightning.cli; from sp_lightning.explainers import as_explainer; "
            "import torch; as_explainer(lambda m, x, t: x, torch.nn.Linear(2, 2)); assert 'captum' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
