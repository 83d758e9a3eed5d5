"""A user's ONNX file read and checked without torch, so that `edgefuse check` and `edgefuse verify` start fast."""
from __future__ import annotations

from pathlib import Path

from ..base.errors import EdgefuseError, first_line
from ..base.files import native


def read_onnx(path: str | Path):
    """A user's ONNX file as a checked ModelProto: missing, empty, not protobuf, or without a graph is one line
    naming the file and the cause, before any runtime sees it."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise EdgefuseError(f"ONNX file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise EdgefuseError(f"{path} is empty (0 bytes): not an ONNX model")
    try:
        model = onnx.load(native(path)) if isinstance(native(path), str) else onnx.load_from_string(native(path))
    except Exception as e:  # protobuf raises several kinds on a corrupt or truncated file
        raise EdgefuseError(f"{path} is not a readable ONNX model (truncated or another format?): "
                            f"{first_line(e)}") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise EdgefuseError(f"{path} holds no ONNX graph (no nodes, inputs or outputs): truncated or another format?")
    return model
