"""Evaluation: segmentation metrics (Dice, IoU, HD95, surface Dice) per case and over folders."""
