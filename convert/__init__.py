"""Checkpoint conversion scripts (thin wrappers over `samjax.io.checkpoint`)."""
