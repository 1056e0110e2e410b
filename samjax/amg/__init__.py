"""Automatic mask generation: host orchestration (generator), exact building blocks (utils)."""
