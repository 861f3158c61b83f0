"""Stage 7, cells: from trained runs to the competition's per-cell answer. Cell scores under a rule (`scoring`),
out-of-fold relabelling of cell tiles, a step of its own that trains fold models (`relabel`), and the submission
with its local cell-level evaluation (`submit`).

May import: core, segmentation, data, sample, plots, training.
"""
