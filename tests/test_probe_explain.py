"""The pure explanation step: model + probe images -> Explanations, without a Trainer."""

from __future__ import annotations

import pytest
import torch

from sp_lightning.probe.explain import reduce_channels


def test_reduce_channels_each_reduction() -> None:
    attribution = torch.tensor([[[[1.0, -2.0]], [[3.0, 2.0]]]])  # (1, C=2, H=1, W=2)
    assert torch.equal(reduce_channels(attribution, "mean"), torch.tensor([[[2.0, 0.0]]]))
    assert torch.equal(reduce_channels(attribution, "sum"), torch.tensor([[[4.0, 0.0]]]))
    assert torch.equal(reduce_channels(attribution, "abs_mean"), torch.tensor([[[2.0, 2.0]]]))
    assert torch.allclose(reduce_channels(attribution, "l2"), torch.tensor([[[10.0**0.5, 8.0**0.5]]]))
    assert reduce_channels(torch.zeros(2, 5, 3, 4, 6)).shape == (2, 5, 4, 6)
    with pytest.raises(ValueError, match="reduction must be one of"):
        reduce_channels(attribution, "max")
    with pytest.raises(ValueError, match=r"\(\.\.\., C, H, W\)"):
        reduce_channels(torch.zeros(4, 4))
