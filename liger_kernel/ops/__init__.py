"""liger-kernel 0.8's ``liger_kernel.ops`` import paths that user code reaches into."""
