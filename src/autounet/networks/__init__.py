"""U-Net and its variants, built from plain-data specifications."""
