"""liger_core: the multi-backend dispatch framework under ``liger_kernel``.

``call(op, *inputs, **attrs)`` runs an operator through the backend selected for its device, dtype and shape;
``use_backend(...)`` requires backends inside a ``with`` block. See DESIGN.md for the selection order.
"""

__version__ = "1.0.0"

from .dispatch import call, select_backend, use_backend  # noqa: E402
from .errors import BackendUnavailableError  # noqa: E402

__all__ = ["__version__", "call", "select_backend", "use_backend", "BackendUnavailableError"]
