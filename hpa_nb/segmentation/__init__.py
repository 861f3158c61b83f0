"""Stage 2, segmentation: an image's cells as an instance mask. Reading an image's stains (`images`), the classical
method (`classical`), HPA-Cell-Segmentation (`hpacellseg`, with its offline folder in `offline`), the table that
picks one by name (`backends.segment`), and their quality against the sample's true cells (`quality`).

May import: core.
"""
