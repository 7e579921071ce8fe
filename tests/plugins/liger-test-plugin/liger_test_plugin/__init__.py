"""Backends `testplug` and `testslow` (see tests/plugins/README.md)."""

from liger_core.spec import BackendSpec

BACKEND = BackendSpec(
    name="testplug",
    priority=200,
    kernels={
        "rms_norm": "liger_test_plugin.kernels:RMS_NORM",
        "scale": "liger_test_plugin.kernels:SCALE",
    },
    operators={"scale": "liger_test_plugin.scale:SPEC"},
    version="0.1.0",
)


def make_slow_backend() -> BackendSpec:
    # An entry point may name a zero-argument factory instead of a spec.
    return BackendSpec(
        name="testslow",
        priority=200,
        kernels={"rms_norm": "liger_test_plugin.kernels:SLOW_RMS_NORM"},
        version="0.1.0",
    )
