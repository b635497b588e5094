"""TAP converter: calibrate a model and write a nested multi-tier checkpoint.

The converter may import the runtime (for the shared format); the runtime never imports this.
"""

from .convert import ConvertOptions, convert
from .push import push_to_hub
from .quantize import quantize_plane, quantize_rows, quantize_tiers, sqnr_db

__all__ = ["ConvertOptions", "convert", "push_to_hub", "quantize_plane", "quantize_rows", "quantize_tiers", "sqnr_db"]
