"""Stage 4, sample: an HPA-like synthetic set in the exact competition layout (`writer`, drawn with `geometry` and
`render`), and the data every command falls back to (`sources`: the competition where it is mounted, else the
sample, generated into the cache on first use).

May import: core, segmentation, data.
"""
