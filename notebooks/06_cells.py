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
# # 06 · Cell tiles: one record per cell (Kaggle CPU, offline)
#
# **Purpose:** labels come per image, but a label is often carried by some of an image's cells only: a
# mitotic spindle by the one or two dividing cells, speckles by about half. Every top solution of the
# competition trained a model on cells. This notebook finds every cell of every training image and cuts it
# into a tile, each with its image's label as a weak target; `07_cell_train` trains the cell model on them.
# **Accelerator:** none (Kaggle's CPU image, internet off: finding cells uses scikit-image, which the TPU image
# lacks). **Runtime:** about 20 s on the default sample (measured, 2 CPU cores); on the full data the kernel
# measures its own cost on its first images and prints the projection before it goes on.
#
# In this notebook we will:
# - go on from the tiles of an earlier version stopped at `HOURS`, when there are any;
# - project the whole job's time and disk from its first images, against the CPU session's 12 h and 20 GB;
# - cut one tile per cell of every training image (restartable, like the shards);
# - look at tiles with their weak labels, beside each cell's own label where the sample has it.

# %% tags=["parameters"]
DATA_DIR = ""  # empty: discover (HPA_DATA_DIR, then the competition data on Kaggle, then the default sample)
RESUME_FROM = ""  # the tiles of an earlier version stopped at HOURS (OWNER/KERNEL attached): go on from them
HOURS = 11.0  # on Kaggle, stop cutting tiles cleanly after this long, keeping every finished file (a CPU session ends at 12 h)
WORKERS = None  # processes that segment and cut the images; None: every core (4 in a Kaggle CPU session)
MAX_GB = 18.0  # /kaggle/working holds 20 GB: stop before writing more as soon as the projected total passes this
QUICK = None  # None: quick off Kaggle, full on Kaggle
SEGMENTATION = ""  # empty: the sample's true cells where it has them (masks/), else "classical"
TILE_SIZE = None  # px; None: 96 (full; 128 px projects past 18 GB on 2048 px images) / 64 (quick)
ENCODING = "png"  # "png": about a third of "raw" on disk (measured), which is what fits the full set in /kaggle/working
ALLOW_SAMPLE_DATA = False  # on Kaggle a full run refuses the synthetic sample unless this is True
N_GALLERY = 12

# %%
import time

import pandas as pd

import hpa_nb  # first: it picks the Keras backend and quiets TensorFlow's C++ logs
from hpa_nb.core import env
from hpa_nb.data import tiles
from hpa_nb.plots import cells as cell_plots
from hpa_nb.plots import figures
from hpa_nb.sample import sources
from hpa_nb.training import inputs, preflight

QUICK = (not env.on_kaggle()) if QUICK is None else QUICK
TILE_SIZE = TILE_SIZE or (64 if QUICK else 96)
DATA = env.Path(DATA_DIR) if DATA_DIR else sources.find_data().path
SEGMENTATION = SEGMENTATION or ("masks" if (DATA / "masks").is_dir() else "classical")
preflight.check_data(DATA, QUICK, ALLOW_SAMPLE_DATA, purpose="cut the tiles of")
TILES = tiles.default_dir()
print(f"data: {DATA}\ncells: {SEGMENTATION}\ntiles: {TILES} ({TILE_SIZE} px, {ENCODING})")

# %% [markdown]
# ## Tiles: one record per cell
# A tile is the cell's bounding box with everything outside the cell set to 0 (the background and the
# neighbouring cells alike), padded to a square and resized to `TILE_SIZE`: exactly what the cell scorer
# shows the cell model at submission time. Each record also keeps the image ID, the cell ID, the image's
# label, the cell's box, its share of the image and whether it touches the border. After its first 32 images
# the writer prints the whole job's projected time and size, and how many versions of `HOURS` it takes. A file
# is renamed into place only when whole, so a stopped run goes on where it was; on Kaggle the cutting stops
# cleanly at `HOURS`, and the next version goes on from this one's output with
# `python -m hpa_nb kaggle push 06_cells --resume-from OWNER/hpa-06-cells`.

# %%
if RESUME_FROM:
    print(f"adopted {tiles.adopt_tiles(inputs.find('tiles', RESUME_FROM), TILES)} finished files")
deadline = time.time() + HOURS * 3600 if env.on_kaggle() else None
manifest = tiles.write_tiles(
    DATA,
    TILES,
    size=TILE_SIZE,
    segmentation=SEGMENTATION,
    encoding=ENCODING,
    deadline=deadline,
    max_gb=MAX_GB if env.on_kaggle() else None,
    workers=WORKERS,
)
if not manifest["complete"]:
    raise SystemExit(
        f"tiles stopped at HOURS with {manifest['images']} images: push this notebook again with "
        "--resume-from OWNER/hpa-06-cells to finish them"
    )

# %%
# NBVAL_CHECK_OUTPUT
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
# ## What we have
# - cell tiles in `tiles/` (the kernel's output on Kaggle), with `tiles.json` listing every image's cells and
#   labels: restartable, and readable through the data layer like the shards;
# - the projected time and disk of the whole job. Next: `07_cell_train` trains the cell model on them, on the
#   TPU (`python -m hpa_nb kaggle push 07_cell_train` attaches this output and 03_train's run).
