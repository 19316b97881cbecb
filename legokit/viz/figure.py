"""The one figure factory of every plot, and the crop the weight pictures share."""

from __future__ import annotations

import matplotlib
from matplotlib.figure import Figure

matplotlib.use(matplotlib.get_backend())  # keep the caller's backend (inline in Jupyter, Agg headless)


def panel_figure(ncols: int = 1, width: float = 4.4, height: float = 3.2, nrows: int = 1, mosaic=None,
                 **mosaic_kw):
    """A constrained-layout Figure of ``nrows x ncols`` panels, each ``width x height`` inches, and its axes.

    The Figure is not registered with pyplot: a notebook shows it once, and a background thread (the Studio's
    run) can draw it safely.

    Args:
        ncols, nrows: the grid of panels (the figure is ``width * ncols`` by ``height * nrows`` inches).
        mosaic: a ``Figure.subplot_mosaic`` layout instead of the grid (``mosaic_kw`` go to it, e.g.
            ``height_ratios``).
    Returns:
        ``(figure, axes)``: the axes as a flat list (row by row), or ``{name: axis}`` for a mosaic.
    """
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    if mosaic is not None:
        return fig, fig.subplot_mosaic(mosaic, **mosaic_kw)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).ravel())


def top_left(t, crop):
    """The top-left ``crop`` (rows, cols) of a 2-D tensor as a numpy array (the whole tensor when None)."""
    a = t.detach().float().cpu().numpy()
    return a if crop is None else a[: crop[0], : crop[1]]
