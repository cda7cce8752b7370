"""Reading what an example run wrote to TensorBoard (shared by the example tests)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

#: The tag prefix of ``SemanticPullbackCallback``'s images (its default ``tag``).
PULLBACK_TAG = "semantic_pullback"


def logged_images(run: str | Path) -> dict[str, list[int]]:
    """Every image tag of one TensorBoard run directory, with the steps it was written at."""
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    return {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}


def assert_pullbacks_logged(run: str | Path, steps: list[int], num_images: int) -> None:
    """``SemanticPullbackCallback`` wrote its overview and one panel per probe image at each of ``steps``."""
    images = logged_images(run)
    assert images.get(f"{PULLBACK_TAG}/overview") == steps, sorted(images)
    panels = {tag: at for tag, at in images.items() if tag.startswith(f"{PULLBACK_TAG}/probe_")}
    assert len(panels) == num_images and all(at == steps for at in panels.values()), panels
