"""Training: losses, patch sampling, augmentation, background loading (and, later, the trainer)."""
