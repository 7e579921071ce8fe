"""liger_kernel: a drop-in for liger-kernel 0.8's public API, served by the liger_core dispatcher."""

from liger_core import __version__

__all__ = ["__version__"]
