"""orchestrators."""
