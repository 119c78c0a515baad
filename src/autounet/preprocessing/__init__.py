"""Preprocessing (seed 001 §2.2): crop to the nonzero region, resample to the target spacing,
normalise, store patch-readable arrays; and the inverse path back to the original image grid."""
