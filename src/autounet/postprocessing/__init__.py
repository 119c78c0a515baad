"""Post-processing: the connected-component rules (seed 001 §2.5), the BraTS ET rule (seed 004 §2.5), deciding them on cross-validation predictions and applying them."""
