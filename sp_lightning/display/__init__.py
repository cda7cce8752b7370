"""Pictures of explanations, as pure functions of tensors.

* ``colour``: robust per-map scaling, the seismic colour map, heatmaps, difference images;
* ``layout``: tile sizes, text, labelled tile grids, PNG/PIL conversion;
* ``panels``: one log's pictures from an immutable :class:`~sp_lightning.display.panels.Frame`;
* ``timelapse``: animated GIF time-lapse files, one per tag.
"""
