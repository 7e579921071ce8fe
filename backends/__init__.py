"""First-party backends of liger-core, installed as the package ``liger_backends``.

Each sub-package defines ``BACKEND``, a `liger_core.spec.BackendSpec` registered in pyproject.toml under the
entry-point group ``liger_kernel.backends``, and one module per operator holding its ``KERNEL``.
"""
