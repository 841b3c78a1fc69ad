"""Pixels in and results out, engine-agnostic: the file formats ecologists' tools read."""
