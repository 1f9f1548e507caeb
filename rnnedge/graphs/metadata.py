"""The rnnedge contract's JSON text in an ONNX model's ``metadata_props``: read and written here.

The text itself is parsed and written by ``rnnedge.contract`` (``from_json`` / ``to_json``);
this module only moves it in and out of an ``onnx.ModelProto``, leaving other keys alone.
"""

from __future__ import annotations

import onnx

from rnnedge.contract import METADATA_KEY


def read_metadata(model: onnx.ModelProto) -> str | None:
    """The model's ``rnnedge`` metadata text, or None when it has none (a graph from elsewhere)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return prop.value
    return None


def write_metadata(model: onnx.ModelProto, text: str) -> None:
    """Set the model's ``rnnedge`` metadata to ``text`` in place; other entries are kept."""
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = text
    onnx.helper.set_model_props(model, props)
