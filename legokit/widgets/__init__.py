"""ipywidgets for JupyterLab: the explorers of notebooks 01-03 (``explorers``) and the LEGO Studio of 05
(``studio_widget``). Every widget is importable from here (``from legokit import widgets; widgets.studio()``)."""

from legokit.widgets.explorers import (
    aggregator_explorer,
    device_editor,
    mask_explorer,
    module_explorer,
    partition_explorer,
    score_explorer,
)
from legokit.widgets.studio_widget import studio, studio_widget

__all__ = [
    "aggregator_explorer",
    "device_editor",
    "mask_explorer",
    "module_explorer",
    "partition_explorer",
    "score_explorer",
    "studio",
    "studio_widget",
]
