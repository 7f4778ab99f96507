"""The one exception hierarchy of the toolkit.

Every error raised on purpose by amct_core or a plugin derives from :class:`AmctError`, and also
from the built-in exception a Python user would expect (``ValueError``, ``FileNotFoundError``,
``TypeError``), so existing ``except`` clauses keep working. Messages say what is wrong, name the
file, layer, key or argument at fault, and say what to do.
"""


class AmctError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class AmctValueError(AmctError, ValueError):
    """An argument or a value read from a file is invalid."""


class AmctTypeError(AmctError, TypeError):
    """An argument has the wrong type."""


class AmctFileNotFoundError(AmctError, FileNotFoundError):
    """A file the user named does not exist."""


class InfoFileError(AmctValueError):
    """A decomposition information file cannot be read or does not follow the schema."""


class ModelMismatchError(AmctValueError):
    """A model does not match the file that describes how to change it."""


class DecompositionError(AmctValueError):
    """A weight cannot be decomposed (wrong rank, NaN/Inf, unsupported dtype)."""


class ConfigError(AmctValueError):
    """A quantization config (JSON or .cfg) cannot be read or does not follow the schema."""


class RecordFileError(AmctValueError):
    """A quantization record file is missing, corrupt, or lacks factors a layer needs."""


class QuantizationError(AmctValueError):
    """A tensor cannot be quantized (bias out of the int32 range, bad bit width ...)."""


class UnsupportedLayerError(AmctValueError):
    """A layer named for quantization is of a type or configuration that cannot be quantized."""
