"""Stage 6, training: from a config to a run folder. The options (`config`), the network (`model`), the learning
rate (`schedule`), the device and its distribution (`accelerator`), batch-norm re-estimation (`batch_norm`), checks
that fail fast (`preflight`), the run folder, its one owner (`run`), finding what earlier kernels wrote
(`inputs`), the split (`split`), `prepare` and its `Plan` (`plan`), the data it feeds (`feeds`), `fit`
(`train`, with its `callbacks`) and scoring a run on held-out images (`evaluate`).

May import: core, segmentation, data, sample, plots.
"""
