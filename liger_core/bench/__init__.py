"""The benchmark machinery behind ``liger-kernel bench`` (DESIGN.md, Benchmarks): cases in `cases`, the processes
and the merged results in `runner`. Recorded results live in the repository's ``benchmarks/results/``."""

from .runner import DEFAULT_IMPLS, markdown, plot, run

__all__ = ["DEFAULT_IMPLS", "markdown", "plot", "run"]
