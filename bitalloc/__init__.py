"""bitalloc: mixed-precision bit-allocation search."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bitalloc")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

from .formats import Format
from .model import QuantizableLayer, from_module, list_layers, load_model
from .types import BitConfig, Measurement, Problem, SensitivityTable, SolveResult


def load_packed(path):
    """A packed checkpoint (`bitalloc pack`) as a LoadedModel whose chosen layers are QuantLinears."""
    from bitalloc.runtimes.bitalloc.checkpoint import load_packed as load

    return load(path)


__all__ = [
    "BitConfig",
    "Format",
    "Measurement",
    "Problem",
    "QuantizableLayer",
    "SensitivityTable",
    "SolveResult",
    "__version__",
    "from_module",
    "list_layers",
    "load_model",
    "load_packed",
]
