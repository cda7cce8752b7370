"""``ShardedImageClassifier``: :class:`ImageClassifier` sharded with FSDP2 under Lightning's ``ModelParallelStrategy``.

``ModelParallelStrategy`` leaves the parallelisation to the model's ``configure_model``;
this one applies ``fully_shard`` to every block of the backbone (each parameterised
element of an ``nn.Sequential``/``nn.ModuleList``: ResNet and ViT blocks, the small
CNN's layers), then to the whole backbone, over the strategy's data-parallel mesh.
"""

from __future__ import annotations

from torch import nn

from .classifier import ImageClassifier


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` to shard on their own: parameterised elements of its Sequentials and ModuleLists.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
        >>> [type(m).__name__ for m in fsdp_units(net)]
        ['Conv2d', 'Conv2d']
    """
    return [
        child
        for parent in model.modules() if isinstance(parent, (nn.Sequential, nn.ModuleList))
        for child in parent.children() if any(True for _ in child.parameters())
    ]


class ShardedImageClassifier(ImageClassifier):
    """An :class:`ImageClassifier` (same arguments) that shards its backbone with FSDP2 in ``configure_model``.

    Use it with ``ModelParallelStrategy(data_parallel_size=<all processes>, tensor_parallel_size=1)``
    (``callbacks/fsdp.yaml``): the strategy's default mesh gives one node's devices to tensor
    parallelism, which this model does not use.
    """

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.backbone, FSDPModule):  # configure_model runs again for validate/test after fit
            return
        mesh = self.device_mesh["data_parallel"]
        for unit in reversed(fsdp_units(self.backbone)):  # inner blocks before the blocks that hold them
            fully_shard(unit, mesh=mesh)
        fully_shard(self.backbone, mesh=mesh)
