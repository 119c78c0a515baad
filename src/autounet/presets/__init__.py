"""Named recipes as plain data (JSON files in the sub-folders of this package)."""
