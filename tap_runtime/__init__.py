"""TAP runtime: load Token-Adaptive Precision checkpoints and run them with per-token routing.

Importing this package registers the ``tap`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained`` loads TAP checkpoints too.
"""

from .errors import (
    CalibrationDataError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    FormatVersionError,
    InvalidConfigError,
    RoutingTableMismatchError,
    TapError,
    UnsupportedArchitectureError,
)
from .format import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS, RoutingTable
from .hf_integration import register as _register_with_transformers
from .load import load
from .metrics import GenerationMetrics
from .model import Generation, TapModel
from .engine import PrecisionMode, TAPConfig, TAPEngine
from .energy import EnergyMonitor, WorkCounts
from .memory import MemoryTracker

_register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "load",
    "TAPEngine",
    "TAPConfig",
    "PrecisionMode",
    "EnergyMonitor",
    "WorkCounts",
    "MemoryTracker",
    "TapModel",
    "Generation",
    "GenerationMetrics",
    "RoutingTable",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "TapError",
    "CalibrationDataError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "InvalidConfigError",
    "RoutingTableMismatchError",
    "UnsupportedArchitectureError",
    "__version__",
]
