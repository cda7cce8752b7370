"""The ``--config`` files of a finished run, for the commands that work after training (``explain``, ``evaluate``).

A fit run's saved ``config.yaml`` also holds ``Trainer.fit``'s own options (``ckpt_path``,
``weights_only``), which are not settings of the model, data or trainer: LightningCLI refuses
them when the config is only built. :func:`config_arguments` drops them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import yaml
from lightning.pytorch import Trainer


def config_arguments(paths: Sequence[str]) -> list[str]:
    """``--config`` arguments for LightningCLI; a fit run's saved ``config.yaml`` loses the ``fit`` options.

    ``Trainer.fit``'s own options (``ckpt_path``, ``weights_only``) are written into the run's
    config but are not settings of the model, data or trainer.
    """
    fit_options = set(inspect.signature(Trainer.fit).parameters) - {"self", "model", "train_dataloaders",
                                                                    "val_dataloaders", "datamodule"}
    arguments = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config {path}: no such file.")
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
        if isinstance(content, dict) and fit_options & set(content):
            arguments += ["--config", yaml.safe_dump({k: v for k, v in content.items() if k not in fit_options})]
        else:
            arguments += ["--config", path]
    return arguments
