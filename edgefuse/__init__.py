"""edgefuse: align N models, fuse them partially (shared trunk + N heads), export one ONNX graph, verify it."""
from .align import align, align_perms
from .barrier import barrier
from .errors import EdgefuseError, UnsupportedModelError
from .export import export_onnx
from .fuse import FusedModel, batch_models, ensemble, fuse
from .metrics import macs, params
from .models import load_models
from .spec import PermSpec, permutation_spec, permute
from .verify import verify

__all__ = ["EdgefuseError", "FusedModel", "PermSpec", "UnsupportedModelError", "align", "align_perms", "barrier",
           "batch_models", "ensemble", "export_onnx", "fuse", "load_models", "macs", "params", "permutation_spec",
           "permute", "verify"]
__version__ = "0.1.0"
