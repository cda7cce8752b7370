"""Heatmap visibility (issue 11): share of a probe panel's pixels visibly tinted, old display code vs new.

    git worktree add --detach /tmp/sp_old HEAD          # the code before the change, outside the repository
    python benchmarks/bench_visibility.py --old /tmp/sp_old

A random-init torchvision resnet18 (10 classes) explains probe images at 160x160 the way a
default ``SemanticPullbackCallback`` does with ``gradient=False, counterfactual=False``: Soft
Pullbacks toward the true class and the top three rivals, reduced by the channel mean. The
maps are computed once here; the old code (``sp_lightning.visualize.explanation_panel`` of
the ``--old`` checkout, per-map division by the maximum) draws them in a subprocess, the new
``render_panels`` draws them here. With no counterfactual or gradient tiles every coloured
pixel comes from a heatmap. A pixel counts as tinted when its HSV saturation exceeds 0.15;
the share is over the whole panel (text, input tile and padding included). Printed per image
set (uniform mid-grey images, and three scikit-image photos): old %, new %, ratio new/old.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
import torchvision

from sp_lightning.display.panels import Frame, PanelStyle, render_panels
from sp_lightning.probe.explain import ExplainSettings, explain_probe
from sp_lightning.engine import SoftRules

SIZE = 160
TINT = 0.15
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

#: Runs in the old checkout: draw each probe panel with the old code and print its tinted share.
OLD_PANEL = """
import sys, torch
from sp_lightning.visualize import explanation_panel
saved = torch.load(sys.argv[1])
for image, maps, captions in zip(saved["images"], saved["maps"], saved["captions"]):
    panel = explanation_panel(image, maps, captions, title="probe", input_caption=["input", "true"])
    top, bottom = panel.amax(dim=0), panel.amin(dim=0)
    saturation = torch.where(top > 0, (top - bottom) / top.clamp_min(1e-12), torch.zeros_like(top))
    print(float((saturation > %r).float().mean()))
""" % TINT


def tinted_share(panel: torch.Tensor) -> float:
    """Share of the pixels of a ``(3, H, W)`` picture whose HSV saturation exceeds :data:`TINT`."""
    top, bottom = panel.amax(dim=0), panel.amin(dim=0)
    saturation = torch.where(top > 0, (top - bottom) / top.clamp_min(1e-12), torch.zeros_like(top))
    return float((saturation > TINT).float().mean())


def image_sets() -> dict[str, torch.Tensor]:
    """Display images ``(N, 3, SIZE, SIZE)`` in [0, 1]: mid-grey, and scikit-image photos when installed."""
    sets = {"grey 0.5 (8 images)": torch.full((8, 3, SIZE, SIZE), 0.5)}
    try:
        from skimage import data
    except ImportError:
        print("scikit-image is missing: photos skipped (pip install scikit-image)")
        return sets
    photos = [torch.tensor(load()).permute(2, 0, 1)[None].float() / 255
              for load in (data.astronaut, data.chelsea, data.coffee)]
    sets["photos (astronaut, chelsea, coffee)"] = torch.cat(
        [F.interpolate(p, size=(SIZE, SIZE), mode="bilinear", antialias=True) for p in photos])
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="checkout of the code before the change (git worktree add ...)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    settings = ExplainSettings(
        top_k=3, gradient=False, counterfactual=False, ascent_steps=5, alpha=1.0,
        bounds=((-MEAN / STD).flatten(), ((1 - MEAN) / STD).flatten()), rules=SoftRules.create(None),
        logits_fn=None, reduction="mean", metrics=(), seed=0)
    print(f"{'images':<38} {'old %':>7} {'new %':>7} {'new/old':>8}")
    for name, images in image_sets().items():
        labels = torch.arange(len(images)) % 10
        result = explain_probe(model, (images - MEAN) / STD, labels, settings)
        frame = Frame(tag="sp", step=0, epoch=0, images=images, labels=labels, class_names=None,
                      explanations=result, style=PanelStyle())
        panels = render_panels(frame)
        new = [tinted_share(panels[f"sp/probe_{i:02d}"]) for i in range(len(images))]
        captions = [[["SP", "p"]] * result.soft_maps.shape[1]] * len(images)
        with tempfile.TemporaryDirectory() as folder:
            saved = os.path.join(folder, "maps.pt")
            torch.save({"images": images, "maps": result.soft_maps, "captions": captions}, saved)
            out = subprocess.run([sys.executable, "-c", OLD_PANEL, saved], cwd=args.old, env={**os.environ,
                                 "PYTHONPATH": args.old}, check=True, capture_output=True, text=True).stdout
        old = [float(line) for line in out.split()]
        old_mean, new_mean = 100 * sum(old) / len(old), 100 * sum(new) / len(new)
        print(f"{name:<38} {old_mean:7.1f} {new_mean:7.1f} {new_mean / old_mean:8.1f}")


if __name__ == "__main__":
    main()
