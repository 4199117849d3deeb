"""observatory."""
