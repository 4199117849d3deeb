"""flops_manager."""
