"""The ``sp-lightning`` command: LightningCLI over :class:`ImageClassifier` and the image DataModules.

Examples::

    sp-lightning fit                                    # small CNN on the synthetic shapes
    sp-lightning tensorboard lightning_logs             # watch it, every logged step kept
    sp-lightning explain --config configs/tiny.yaml --ckpt_path 'lightning_logs/version_0/checkpoints/*.ckpt' --out x
    sp-lightning evaluate --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt --out eval  # paper's table
    sp-lightning fit --config configs/shapes.yaml --config callbacks/ddp.yaml
    sp-lightning fit --model.init_args.backbone timm:resnet18 --data CIFAR10DataModule

The model is any :class:`ImageClassifier` (sub)class and the data any
:class:`ImageDataModule` (sub)class, chosen in YAML with ``class_path`` /
``init_args``; the model's ``num_classes`` is taken from the DataModule.
Callbacks go under ``trainer.callbacks`` (recipes live in ``callbacks/``).
``python -m sp_lightning.cli`` is the same command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from .data import ImageDataModule, ShapesDataModule
from .distributed import releasing_process_group
from .evaluation.run import main as run_evaluate
from .models import ImageClassifier
from .replay import run_explain
from .tensorboard_server import run_tensorboard


class SPLightningCLI(LightningCLI):
    """LightningCLI that links the model's head size to the data and defaults to the shapes demo."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.set_defaults(
            {
                "model": {"class_path": f"{ImageClassifier.__module__}.{ImageClassifier.__qualname__}"},
                "data": {"class_path": f"{ShapesDataModule.__module__}.{ShapesDataModule.__qualname__}"},
            }
        )


def run_cli(args: ArgsType = None, run: bool = True) -> SPLightningCLI:
    """Parse ``args`` (default ``sys.argv[1:]``) and return the CLI (its ``trainer``, ``model``, ``datamodule``).

    With ``run=True`` the arguments start with a subcommand (``fit``, ``validate``...) and it is run;
    with ``run=False`` everything is only built.
    """
    return SPLightningCLI(
        ImageClassifier,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
        run=run,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``sp-lightning`` console command; releases the process group DDP started.

    ``sp-lightning tensorboard LOGDIR`` opens a log directory in TensorBoard; every other
    subcommand is LightningCLI's.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["tensorboard"]:
        sys.exit(run_tensorboard(words[1:]))
    with releasing_process_group():
        if words[:1] == ["evaluate"]:  # the paper's explanation-quality table for a checkpoint
            sys.exit(run_evaluate(words[1:], run_cli))
        if words[:1] == ["explain"]:  # what SemanticPullbackCallback would have logged, for saved checkpoints
            sys.exit(run_explain(words[1:], run_cli))
        run_cli(None if argv is None else words)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
