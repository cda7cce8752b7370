"""``sp-lightning evaluate``: the paper's explanation-quality table (docs/method.md section 6) for a trained checkpoint.

``sp-lightning evaluate --config CONFIG --ckpt_path CKPT --out DIR`` builds the model and the
data from the training config (any options LightningCLI takes may follow, e.g.
``--data.init_args.val_size=256``), loads the checkpoint's weights strictly, draws
``--num_images`` validation images (seeded), and scores every explainer of
:func:`~sp_lightning.evaluation.rows.default_explainers` with Infidelity, faithfulness
correlation and estimate, monotonicity correlation, max-sensitivity and random logit;
with the pointing game and relevance mass when the batches carry object masks
(``(images, labels, masks)``, as the shapes data does), and with Focus on 2x2 mosaics
of the images when they show two classes or more. The table goes to ``DIR/evaluation.csv``,
``DIR/evaluation.md``, TensorBoard (``DIR/tensorboard``) and the terminal.

With ``trainer.devices > 1`` (or several nodes) Lightning Fabric launches one process per
device; each scores its share of the images and the metrics' own DDP sync gathers the
per-image scores before rank 0 writes the table.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..explainers import Explainer
from ..metrics import ExplainerMetric, ExplanationScores, Focus, PointingGame, RelevanceMass, make_mosaics
from ..probe.explain import METRICS, metric_options
from ..probe.input_space import resolve_input_space
from ..run_config import config_arguments
from .rows import default_explainers
from .table import EvaluationTable, Score

#: The paper's columns (docs/method.md section 6), as keys of ``METRICS`` and in table order.
PAPER_METRICS = (
    "infidelity", "faithfulness_correlation", "faithfulness_estimate",
    "monotonicity_correlation", "max_sensitivity", "random_logit",
)


@dataclass(frozen=True)
class Samples:
    """The evaluated validation images (CPU), their labels and, where the data has them, object masks (N, H, W)."""

    images: Tensor
    labels: Tensor
    masks: Tensor | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sp-lightning evaluate",
        description="Score explainers of a trained checkpoint with the paper's metrics; writes evaluation.csv, "
        "evaluation.md and TensorBoard scalars to --out. Further options (e.g. --trainer.devices=2) go to the "
        "model/data/trainer config as in `sp-lightning fit`.",
    )
    parser.add_argument("--config", action="append", required=True, help="training config (YAML); may repeat")
    parser.add_argument("--ckpt_path", required=True, help="the Lightning checkpoint (.ckpt) to evaluate")
    parser.add_argument("--out", required=True, help="directory for evaluation.csv, evaluation.md, tensorboard/")
    parser.add_argument("--num_images", type=_positive, default=1000,
                        help="validation images scored (paper: 1000; at most the validation set)")
    parser.add_argument("--batch_size", type=_positive, default=16, help="images explained at a time")
    parser.add_argument("--fast", action="store_true",
                        help="the callback's cheap metric settings (fewer draws) and fewer SmoothGrad/IG samples")
    parser.add_argument("--seed", type=int, default=0, help="seeds the image choice, mosaics and perturbations")
    parser.add_argument("--explainers", nargs="+", metavar="NAME",
                        help="score only these rows (default: all; Gradient SoftPullback PullbackAscent SmoothGrad, "
                        "and IntegratedGradients GuidedGradCam with Captum)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def load_weights(model: nn.Module, path: str) -> None:
    """The checkpoint's weights into ``model``, strictly: a checkpoint of another model is a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ckpt_path {path}: no such file.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (it has no 'state_dict'): pass a .ckpt the Trainer saved.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).split("\n\t", 1)[-1].replace("\n\t", " ")[:600]
        raise ValueError(
            f"{path} holds the weights of another model than the config builds ({type(model).__name__}): {detail} "
            "Pass the config the checkpoint was trained with (its run directory's config.yaml)."
        ) from None


def pick_samples(dataset: Dataset, count: int, seed: int) -> Samples:
    """``count`` images (or all, if fewer) drawn without replacement from ``dataset`` with a seeded generator."""
    size = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: min(count, size)]
    batch = next(iter(DataLoader(Subset(dataset, order.tolist()), batch_size=len(order))))
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("evaluate needs validation samples (image, label, ...) to score explanations toward the label.")
    images, labels = batch[0], batch[1]
    masks = batch[2] if len(batch) > 2 else None
    has_masks = isinstance(masks, Tensor) and masks.shape == (len(images), *images.shape[2:])
    return Samples(images.float(), labels.long(), masks.bool() if has_masks else None)


def metric_factories(
    model: nn.Module, classes: int, bounds: tuple[Tensor, Tensor], fast: bool, seed: int, masks: bool
) -> dict[str, Any]:
    """Column name -> factory of that metric for one explainer (the paper's columns, then the mask metrics)."""

    def factory(name: str) -> Any:
        cls = METRICS[name]
        options = metric_options(name, classes, bounds, cheap=fast)

        def build(explainer: Explainer) -> Any:
            extra = {"explainer": explainer} if issubclass(cls, ExplainerMetric) else {}
            return cls(model, seed=seed, **options, **extra)

        return cls.__name__, build

    factories = dict(factory(name) for name in PAPER_METRICS)
    if masks:
        factories["PointingGame"] = lambda explainer: PointingGame(model)
        factories["RelevanceMass"] = lambda explainer: RelevanceMass(model)
    return factories


def score(fabric: Fabric, model: nn.Module, samples: Samples, bounds: tuple[Tensor, Tensor], classes: int,
          options: argparse.Namespace) -> tuple[dict[str, dict[str, Score]], list[str]]:
    """Every explainer's scores on this rank's share of ``samples``, synced over all ranks."""
    device, rank, world = fabric.device, fabric.global_rank, fabric.world_size
    width = float((bounds[1] - bounds[0]).mean())
    explainers, notes = default_explainers(model, samples.images.shape[1:], width, options.fast)
    if options.explainers:
        unknown = sorted(set(options.explainers) - set(explainers))
        if unknown:
            raise ValueError(f"--explainers: unknown or unavailable {unknown}; choose from {list(explainers)}.")
        explainers = {name: explainers[name] for name in options.explainers}
        notes = []
    factories = metric_factories(model, classes, bounds, options.fast, options.seed, samples.masks is not None)
    scores = ExplanationScores(explainers, factories)
    for per_explainer in scores.metrics.values():
        for metric in per_explainer.values():
            metric.to(device)  # the score states live where the images are, for the DDP sync
    share = torch.arange(rank, len(samples.images), world)
    for start in range(0, len(share), options.batch_size):
        index = share[start : start + options.batch_size]
        masks = None if samples.masks is None else samples.masks[index].to(device)
        scores.update(samples.images[index].to(device), samples.labels[index].to(device), masks)
        fabric.print(f"evaluate: {min(start + options.batch_size, len(share))}/{len(share)} images (rank 0)")
    focus: dict[str, Focus] = {}
    if samples.labels.unique().numel() >= 2:
        mosaics = make_mosaics(samples.images, samples.labels, count=max(world, len(samples.images) // 2),
                               generator=options.seed)
        focus = {name: Focus(model).to(device) for name in explainers}
        mine = torch.arange(rank, len(mosaics.images), world)
        for start in range(0, len(mine), options.batch_size):
            index = mine[start : start + options.batch_size]
            images, target = mosaics.images[index].to(device), mosaics.target[index].to(device)
            for name, explainer in explainers.items():
                focus[name].update(images, explainer.attribute(images, target), target, mosaics.tile_labels[index])
        notes.append(f"Focus on {len(mosaics.images)} 2x2 mosaics of the same images (chance 0.5).")
    else:
        notes.append("Focus: left out, the images show a single class (mosaics need two).")
    table = {
        name: {
            **{column: Score.of(metric.per_sample_scores().cpu()) for column, metric in scores.metrics[name].items()},
            **({"Focus": Score.of(focus[name].per_sample_scores().cpu())} if focus else {}),
        }
        for name in explainers
    }
    return table, notes


def evaluate(argv: Sequence[str], build: Callable[..., Any]) -> EvaluationTable | None:
    """Run the command with ``argv`` (the words after ``evaluate``); the table on rank 0, ``None`` on other ranks.

    Args:
        argv: the command's words.
        build: ``sp_lightning.cli.run_cli``: builds the model, data and trainer from config arguments.
    """
    options, rest = build_parser().parse_known_args(list(argv))
    with warnings.catch_warnings():  # LightningCLI warns that sys.argv (this command's) is not what it parses
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = build([*config_arguments(options.config), *rest], run=False)
    model, data, config = cli.model, cli.datamodule, cli.config.trainer
    load_weights(model, options.ckpt_path)
    strategy = config.strategy if isinstance(config.strategy, str) else "auto"
    fabric = Fabric(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                    strategy=strategy)
    fabric.launch()
    if fabric.world_size > options.num_images:
        raise ValueError(f"--num_images {options.num_images} is fewer than the {fabric.world_size} processes.")
    if fabric.is_global_zero:
        data.prepare_data()
    fabric.barrier()
    data.setup("validate")
    if getattr(data, "val_set", None) is None:
        raise RuntimeError(f"{type(data).__name__} has no validation split (val_set) to evaluate on.")
    samples = pick_samples(data.val_set, options.num_images, options.seed)
    model.to(fabric.device)
    space = resolve_input_space(samples.images, data)
    bounds = tuple(b.to(fabric.device) for b in space.bounds)
    classes = len(getattr(data, "class_names", [])) or int(samples.labels.max()) + 1
    scores, notes = score(fabric, model, samples, bounds, classes, options)
    if not fabric.is_global_zero:
        return None
    low, high = (float(b.min()) for b in space.bounds)
    settings = "fast (the callback's cheap settings)" if options.fast else "the paper's"
    table = EvaluationTable(
        scores,
        {column: bool(higher) for column, higher in _directions(scores).items()},
        (f"Settings: {settings}, scaled to {tuple(samples.images.shape[1:])} inputs in [{low:.2f}, {high:.2f}]; "
         f"seed {options.seed}; {fabric.world_size} process(es); checkpoint {options.ckpt_path}.", *notes),
    )
    table.write(options.out)
    print(table.markdown())
    return table


def _directions(scores: dict[str, dict[str, Score]]) -> dict[str, bool]:
    """Whether higher is better, per column (read from the metric classes)."""
    classes = {cls.__name__: cls for cls in (*METRICS.values(), PointingGame, RelevanceMass, Focus)}
    return {column: bool(classes[column].higher_is_better) for column in next(iter(scores.values()))}


def main(argv: Sequence[str], build: Callable[..., Any]) -> int:
    """Entry point of ``sp-lightning evaluate`` (``build``: see :func:`evaluate`); the exit status."""
    evaluate(argv, build)
    return 0
