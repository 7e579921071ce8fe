"""liger-kernel 0.8's ``liger_kernel.ops.experimental`` import paths."""
