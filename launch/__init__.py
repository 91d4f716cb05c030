"""Thin console entry points; the logic they call lives in training/, export/ and serving/."""
