"""Stage 5, plots: figures drawn from arrays and tables, never from a run folder or a model's code. Saving and
showing them (`figures`), images, labels and scores (`charts`), training curves and the model diagram
(`training`), and cells over their images (`cells`). plotly, kaleido and visualkeras are imported where used.

May import: core, segmentation, data, sample.
"""
