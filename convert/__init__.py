"""Checkpoint conversion scripts (thin wrappers over `samjax.checkpoint`)."""
