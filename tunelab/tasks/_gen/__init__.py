"""Seeded generators of the bundled tasks' data; run them through `python -m tunelab.tasks.generate`."""
