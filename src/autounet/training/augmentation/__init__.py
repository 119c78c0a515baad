"""Augmentation on batched tensors, on the training device, configured by presets (plain data)."""
