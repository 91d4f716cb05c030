"""Parallelism for adsfm models: layout config, planning, and the one function that applies it."""
