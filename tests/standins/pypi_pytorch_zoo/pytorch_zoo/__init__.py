"""Stand-in for PyPI's unrelated `pytorch-zoo`: the same import name, no `unet` module."""
