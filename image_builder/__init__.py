"""image_builder."""
