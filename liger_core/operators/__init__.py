"""The operator catalogue: one module per operator, each defining ``SPEC``, an `OpSpec`.

The registry imports a module the first time its operator is called (see `liger_core.registry.CATALOGUE`).
"""
