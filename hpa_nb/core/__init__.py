"""Stage 1, core: what every stage shares. The competition's 19 classes (`labels`) and its cell-level metric
(`metrics`), where the code runs (`env`: Kaggle, a TPU VM, the cache), atomic file writes (`files`), time and disk
projections (`budget`), per-image work on every core (`workers`), the package's log (`log`) and the Kaggle
chain's table of kernels (`chain`).

May import: nothing else of hpa_nb.
"""
