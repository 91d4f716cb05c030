"""The bridge from training to serving: checkpoint in, self-contained artifact out."""
