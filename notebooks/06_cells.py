# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · A model that sees cells
#
# **Purpose:** labels come per image, but a label is often carried by some of an image's cells only: a
# mitotic spindle by the one or two dividing cells, speckles by about half. Every top solution of the
# competition trained a model on cells. Here we cut every training cell into a tile, train a cell model
# with each cell's image label as a weak target, and score test cells with the image model and the cell
# model together.
# **Accelerator:** none (CPU). **Runtime:** a few minutes on the default sample (the cell model's training
# is most of it).
#
# In this notebook we will:
# - cut one tile per cell of every training image (restartable, like the shards);
# - look at tiles with their weak labels, beside each cell's own label where the sample has it;
# - train the cell model on the tiles, split by image exactly as the image run was;
# - compare a few cells' image-model and cell-model scores;
# - give the local cell mAP of the image model, the cell model and the two combined, in both readings.

# %% tags=["parameters"]
DATA_DIR = ""  # empty: discover (HPA_DATA_DIR, then the competition data on Kaggle, then the default sample)
RUN_DIR = ""  # empty: <working dir>/run, the image run 03_train writes
CELL_RUN_DIR = ""  # empty: <working dir>/cell_run
TILES_FROM = ""  # tiles written elsewhere: a folder, or OWNER/KERNEL attached as input; empty: write them here
RESUME_TILES_FROM = ""  # the tiles of an earlier version stopped at HOURS (OWNER/KERNEL attached): go on from them
HOURS = 11.0  # on Kaggle, stop cutting tiles cleanly after this long, keeping every finished file (a CPU session ends at 12 h)
QUICK = None  # None: quick off Kaggle, full on Kaggle
SEGMENTATION = ""  # empty: the sample's true cells where it has them (masks/), else "classical"
TILE_SIZE = 64  # px; 128 or more for full-size images
RELABEL = False  # True: targets from out-of-fold cell models (hpa_nb.relabel); about three times the training
N_GALLERY = 12
EVAL_DATA = ""  # images with true cells to compare the scorings on; empty: on a sample, 400 held-out images drawn
# by the sample generator with another seed (hpa_nb.env.EVALUATION_SAMPLE), none of them trained on

# %%
import time

import numpy as np
import pandas as pd

import hpa_nb  # first: it picks the Keras backend and quiets TensorFlow's C++ logs
from hpa_nb import cell_plots, cells, env, figures, run, submit, tiles, train
from hpa_nb.config import TrainConfig
from hpa_nb.labels import LABEL_NAMES

QUICK = (not env.on_kaggle()) if QUICK is None else QUICK
DATA = env.Path(DATA_DIR) if DATA_DIR else env.find_data().path
RUN = env.Path(RUN_DIR) if RUN_DIR else run.default_dir()
CELL_RUN = env.Path(CELL_RUN_DIR) if CELL_RUN_DIR else env.working_dir() / "cell_run"
SEGMENTATION = SEGMENTATION or ("masks" if (DATA / "masks").is_dir() else "classical")
image_config = train.ensure_run(RUN, quick=QUICK)  # the image run whose split the cell run keeps
print(f"data: {DATA}\nimage run: {RUN} ({image_config.backbone}, {image_config.image_size} px)\ncells: {SEGMENTATION}")

# %% [markdown]
# ## Tiles: one record per cell
# A tile is the cell's bounding box with everything outside the cell set to 0 (the background and the
# neighbouring cells alike), padded to a square and resized to `TILE_SIZE`: exactly what the cell scorer
# shows the cell model at submission time. Each record also keeps the image ID, the cell ID, the image's
# label, the cell's box, its share of the image and whether it touches the border. A file is renamed into
# place only when whole, so a stopped run goes on where it was; on Kaggle the cutting stops cleanly at `HOURS`,
# and the next version goes on from this one's output with `RESUME_TILES_FROM`.

# %%
TILES = env.find_tiles(TILES_FROM) if TILES_FROM else env.working_dir() / "tiles"
if not TILES_FROM:
    if RESUME_TILES_FROM:
        print(f"adopted {tiles.adopt_tiles(env.find_tiles(RESUME_TILES_FROM), TILES)} finished files")
    deadline = time.time() + HOURS * 3600 if env.on_kaggle() else None
    tiles.write_tiles(DATA, TILES, size=TILE_SIZE, segmentation=SEGMENTATION, deadline=deadline)
manifest = tiles.read_manifest(TILES)
if not manifest["complete"]:
    raise SystemExit(f"tiles stopped at HOURS with {manifest['images']} images: push this notebook again with "
                     "RESUME_TILES_FROM set to this version's output to finish them")
print(f"{manifest['count']} cells of {manifest['images']} images, {manifest['size']} px, {manifest['channels']}")

# %% [markdown]
# Each tile is titled with its weak label, the label of its image. On the sample each cell also has its own
# label (`cells.csv`), shown underneath: in red where the cell lacks a class its image has. Those are the
# cells a weak target gets wrong, and what the cell model must learn to see past.

# %%
crops, info = tiles.load_tiles(TILES, N_GALLERY)
truth = None
if SEGMENTATION == "masks" and (DATA / "cells.csv").is_file():
    table = pd.read_csv(DATA / "cells.csv", dtype={"ID": str, "Label": str})
    truth = dict(zip(table["ID"] + "_" + table["CellID"].astype(str), table["Label"]))
figures.saved(cell_plots.tile_gallery(crops, info, truth), env.working_dir() / "06_cells" / "tiles")

# %% [markdown]
# ## Training the cell model
# The same training as the image model's (run folder, resume, accelerator), on tiles. The split is by
# image and is the image run's own (`split_from`), so no cell of an image the image model validated on is
# trained on here, and the two models can be compared on the same held-out images.

# %%
cell_config = TrainConfig.make(QUICK, level="cell", tiles=str(TILES), data_dir=str(DATA), out_dir=str(CELL_RUN),
                               split_from=str(RUN), relabel=RELABEL, image_size=TILE_SIZE,
                               seed=image_config.seed, val_fraction=image_config.val_fraction)
plan = train.prepare(cell_config)
print(plan.summary())

# %%
result = train.fit(plan)

# %% [markdown]
# ## One image's cells, seen by both models
# The image model gives every cell of an image much the same scores; the cell model tells the cells apart.
# For the held-out image below: each true cell's labels, and both models' score for each class of the image.

# %%
image_model = submit.load_classifier(RUN)
cell_model = submit.load_classifier(CELL_RUN, level="cell")
held_out = run.load_split(RUN)["val"]
has_truth = (DATA / "cells.csv").is_file()
if has_truth:
    from hpa_nb.segmentation_quality import load_cell_truth

    masks, cell_labels = load_cell_truth(DATA, held_out)
    example = max(held_out, key=lambda i: len({tuple(v) for v in cell_labels[i].values()}))  # the most varied
    both = cells.predict_images(image_model, DATA, [example], rule=cells.ScoreRule(image_weight=1.0),
                                masks=masks, progress=False)[example]
    alone = cells.predict_images(image_model, DATA, [example], rule=cells.ScoreRule(image_weight=0.0),
                                 masks=masks, progress=False, cell_model=cell_model)[example]
    classes = sorted({int(c) for v in cell_labels[example].values() for c in np.flatnonzero(v)})
    rows = [{"cell": int(c), "true": ", ".join(LABEL_NAMES[k][:14] for k in np.flatnonzero(cell_labels[example][c])),
             **{f"{LABEL_NAMES[k][:12]}: image / cell": f"{s1[k]:.2f} / {s2[k]:.2f}" for k in classes}}
            for c, s1, s2 in zip(both.cell_ids, both.scores, alone.scores)]
    display(pd.DataFrame(rows))

# %% [markdown]
# ## The local cell mAP: image model, cell model, both
# Scored on held-out images with true cells, each segmented once, in both readings of the metric
# (`05_submission` explains them). "image × cell" is the combined rule of `submit --cell-model`:
# `image ** 0.3 * cell ** 0.7`, then a cell where no class is likely becomes Negative. The sample's own
# held-out images (50 validation and 16 test images) are too few to tell scorings apart: a class seen in one
# image only, on one cell, moves the mAP by 0.04 when that cell changes rank. So the comparison runs on 400 fresh
# images from the same generator with another seed, which neither model has seen
# (`python -m hpa_nb compare --model RUN --cell-model CELL_RUN` gives the same table).
# %%
if has_truth:
    evaluation = env.Path(EVAL_DATA) if EVAL_DATA else env.ensure_evaluation_sample()
    comparison = submit.compare_models(image_model, cell_model, evaluation, progress=False)
    print(f"{len(comparison.evaluations['cell model'].predictions)} held-out images of {evaluation}")
    display(comparison.table().round(3))
# %% [markdown]
# ## What we have
# - cell tiles (`tiles/`), restartable and readable through the data layer like the shards;
# - a cell model trained on weak labels, split by image as the image run was (`cell_run/`);
# - the local cell mAP of each model and of the two combined: `python -m hpa_nb submit --model RUN
#   --cell-model CELL_RUN` writes the combined submission.
