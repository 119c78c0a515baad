"""Inference: sliding-window prediction in preprocessed space (and, later, the full predictor)."""
