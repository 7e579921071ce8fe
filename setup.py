"""Package discovery only (everything else is in pyproject.toml): the backends/ folder installs as liger_backends."""

from setuptools import find_packages, setup

packages = find_packages(include=["liger_core", "liger_core.*", "liger_kernel", "liger_kernel.*"])
packages += ["liger_backends"] + [f"liger_backends.{name}" for name in find_packages("backends")]

setup(
    packages=packages,
    package_dir={"liger_backends": "backends"},
    package_data={"liger_backends": ["cuda/csrc/*"]},
)
