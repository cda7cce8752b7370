"""LightningCLI entry point for the SLURM example (any importable model/data class path works).

    python examples/slurm/train.py fit --config examples/slurm/config.yaml --config callbacks/soft_training_with_explanations.yaml

On a cluster, ``soft_training.sbatch`` starts one copy per GPU with ``srun``;
Lightning reads the SLURM environment (ranks, master address) by itself.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from sp_lightning.distributed import releasing_process_group


def main(args: list[str] | None = None) -> LightningCLI:
    """Parse ``args`` (default: the command line), run the subcommand, release the process group."""
    with releasing_process_group():
        return LightningCLI(
            subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args
        )


if __name__ == "__main__":
    main()
