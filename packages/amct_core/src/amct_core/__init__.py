"""amct_core: the framework-free core of the AMCT model-compression toolkit.

It holds the math of each algorithm once (arrays in, arrays out), the file schemas, logging in
the AMCT format and the exception hierarchy. Framework plugins adapt their objects to it.
"""
from amct_core.errors import AmctError

__version__ = "0.1.0"

__all__ = ["AmctError", "__version__"]
