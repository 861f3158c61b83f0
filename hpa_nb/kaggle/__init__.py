"""Stage 8, kaggle: the notebooks as Kaggle kernels. Self-contained bundles and their metadata (`kernels`) and the
thin wrapper around the official kaggle CLI that pushes them and fetches their output (`push`).

May import: core, segmentation, data, sample, plots, training, cells. Only `hpa_nb.cli` and `hpa_nb.bench` (and the
notebooks) sit above it.
"""
