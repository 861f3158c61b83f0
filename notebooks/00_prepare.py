# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
# ---

# %% [markdown]
# # 00 · Compact shards for the TPU (Kaggle CPU, offline)
#
# **Purpose:** read the competition's full-size images once and write them as compact shards: one record
# per image, all four stains resized to 512 px, PNG-compressed. A TPU v5e-8 can take images faster than
# its host can decode 2048 px 16-bit PNGs, so training on the raw competition files leaves the chips
# waiting; from the shards each image costs one small decode.
# **Accelerator:** none (Kaggle's CPU image, internet off, the competition attached).
# **Runtime:** about 20 s on the default sample (measured, 2 CPU cores); on the full data a few hours on
# Kaggle's 4 CPUs (estimated from the decode cost, not measured), well inside the 12-hour CPU session.
#
# In this notebook we will:
# - check that the competition data is attached (a full run refuses the synthetic sample);
# - go on from the shards of an earlier, stopped version when there are any;
# - write the shards, stopping at once if their projected total would not fit in `/kaggle/working`;
# - project the full set's size from the bytes per image measured here;
# - read a few images back through the training reader.
#
# Then train from them: `python -m hpa_nb kaggle push 03_train --shards OWNER/hpa-00-prepare`, or attach
# this notebook's output to `03_train` by hand; `03_train` finds the shards and checks them against the
# competition's `train.csv`.

# %% tags=["parameters"]
DATA_DIR = ""  # empty: discover (HPA_DATA_DIR, then the competition data on Kaggle, then the default sample)
OUT_DIR = ""  # empty: <working dir>/shards (/kaggle/working/shards on Kaggle, the kernel's output)
RESUME_FROM = ""  # shards of an earlier, stopped version: its folder, or OWNER/KERNEL attached as input
QUICK = None  # None: quick off Kaggle (128 px shards of the sample), full on Kaggle
SIZE = None  # None: 512 px (full) / 128 px (quick)
CHANNELS = "rgby"
ENCODING = "png"  # "png": about 4x smaller than "raw" on fluorescence images; "raw" reads fastest
MAX_GB = 18.0  # /kaggle/working holds 20 GB: stop as soon as the projected total passes this
HOURS = 11.0  # stop cleanly after this long, keeping every finished shard (a Kaggle CPU session ends at 12 h)
SKIP_BAD = True  # skip an unreadable image with a warning line rather than stop hours into the run
ALLOW_SAMPLE_DATA = False  # on Kaggle a full run refuses the synthetic sample unless this is True

# %%
import time

import pandas as pd

import hpa_nb  # first: it quiets TensorFlow's C++ logs
from hpa_nb.core import env
from hpa_nb.data import competition, pipeline, shards
from hpa_nb.plots import charts, figures
from hpa_nb.sample import sources
from hpa_nb.training import inputs, preflight

QUICK = (not env.on_kaggle()) if QUICK is None else QUICK
SIZE = SIZE or (128 if QUICK else 512)
DATA = env.Path(DATA_DIR) if DATA_DIR else sources.find_data().path
OUT = env.Path(OUT_DIR) if OUT_DIR else env.working_dir() / "shards"
preflight.check_data(DATA, QUICK, ALLOW_SAMPLE_DATA, purpose="write shards of")
print(f"source: {DATA}\nshards: {OUT} ({SIZE} px, {CHANNELS}, {ENCODING})")

# %% [markdown]
# ## Going on from a stopped version
# A shard is renamed into place only when it is whole, so a stopped run loses at most the shard it was
# writing. In one session, running the next cell again goes on where it stopped. Across sessions, push the
# next version with `--resume-from OWNER/hpa-00-prepare`: its output (the finished shards) is attached as
# input and copied here first.

# %%
if RESUME_FROM:
    adopted = shards.adopt_shards(inputs.find("shards", RESUME_FROM), OUT)
    print(f"adopted {adopted} finished shards from {RESUME_FROM}")

# %% [markdown]
# ## Writing the shards
# `write_shards` reads each image's channels once, resizes them together and writes one record per image.
# After the first 32 images, and again after every shard, it projects the total from the bytes written so
# far and stops if that passes `MAX_GB`. At `HOURS` it stops after the shard in hand and marks the
# manifest incomplete, so the session still ends with its output saved.

# %%
manifest = shards.write_shards(
    DATA,
    OUT,
    size=SIZE,
    channels=CHANNELS,
    encoding=ENCODING,
    skip_bad=SKIP_BAD,
    max_gb=MAX_GB,
    deadline=time.time() + HOURS * 3600,
)

# %%
# NBVAL_CHECK_OUTPUT
print(
    f"{manifest['count']} images in {len(manifest['shards'])} shards, complete: {manifest['complete']}, "
    f"skipped as bad: {manifest['skipped']}"
)

# %% [markdown]
# ## Will the full set fit?
# The bytes per image measured here, times the 21,806 images of the competition's `train.csv`. On the
# synthetic sample this says little about real images, whose PNGs compress differently; the full run
# measures its own after 32 images and stops if the projection does not fit.

# %%
per_image = manifest["bytes_per_image"]
projection = pd.DataFrame(
    {
        "images": [manifest["count"], competition.TRAIN_IMAGES],
        "GB": [manifest["bytes"] / 1e9, per_image * competition.TRAIN_IMAGES / 1e9],
    },
    index=[f"written here ({SIZE} px)", f"full training set at {SIZE} px (projected)"],
)
projection["kB per image"] = per_image / 1e3
projection.round(3)

# %% [markdown]
# ## Reading them back
# The training reader opens the shards it was given and decodes a few images. The channels are red
# (microtubules), green (the protein), blue (nucleus) and yellow (ER); the composite shows the first three.

# %%
dataset = pipeline.open_dataset(DATA, image_size=SIZE, channels=CHANNELS, with_id=True, shards=OUT)
images, label_rows, ids = pipeline.take_images(dataset, 3)
figures.saved(charts.channel_grid(images, label_rows, ids), env.working_dir() / "00_prepare" / "shard_images")

# %% [markdown]
# ## What we have
# - compact shards in `shards/` with a `manifest.json` listing every image's ID and label;
# - the bytes per image, and the full set's projected size against the 20 GB of `/kaggle/working`;
# - a check that the training reader decodes them.
#
# Next, `03_train` with this notebook's output attached (`--shards OWNER/hpa-00-prepare`).
