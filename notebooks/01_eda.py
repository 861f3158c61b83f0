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
# # 01 · Exploring the HPA single-cell images
#
# **Purpose:** get to know the data before training on it: what is there, how the 19 localisation
# classes are spread, and what the four stains look like.
# **Accelerator:** none (CPU). **Runtime:** about 15 s on the default sample (measured, 2 CPU cores);
# an estimated few minutes on the full competition data (21,806 images; the size survey reads PNG headers only).
#
# In this notebook we will:
# - find the data (the competition's on Kaggle, the synthetic default sample elsewhere);
# - count images and labels, and derive the class weights the training loss uses;
# - look at how many labels an image carries and which ones come together;
# - survey image sizes and bit depths;
# - look at the red, green, blue and yellow channels of a few images, alone and as composites.

# %% tags=["parameters"]
DATA_DIR = ""  # empty: discover (HPA_DATA_DIR, then the competition data on Kaggle, then the default sample)
QUICK = None  # None: quick off Kaggle, full on Kaggle
N_PREVIEW = 3  # images in the channel preview
SIZE_SURVEY_LIMIT = None  # None: every image on Kaggle, 200 in quick mode

# %%
import pandas as pd

import hpa_nb  # first: it picks the Keras backend and quiets TensorFlow's C++ logs
from hpa_nb.core import env, labels
from hpa_nb.data import competition, pipeline
from hpa_nb.plots import charts, figures
from hpa_nb.plots import training as training_plots
from hpa_nb.sample import sources

QUICK = (not env.on_kaggle()) if QUICK is None else QUICK
SIZE_SURVEY_LIMIT = SIZE_SURVEY_LIMIT or (200 if QUICK else None)
source = sources.find_data() if not DATA_DIR else sources.DataSource(env.Path(DATA_DIR), "parameter", "DATA_DIR")
DATA = source.path
OUT = env.working_dir() / "01_eda"
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Which data did we find?
# The same discovery runs in every notebook and command: `HPA_DATA_DIR` wins, then the competition
# data under `/kaggle/input`, then the synthetic default sample, which has the exact competition layout.

# %%
# NBVAL_CHECK_OUTPUT
print("data source:", source.kind)
print(
    "layout:",
    sorted(
        path.name
        for path in DATA.iterdir()
        if path.name in {"train.csv", "train", "train_tfrecords", "test", "sample_submission.csv"}
    ),
)

# %% [markdown]
# ## Images and labels
# `train.csv` gives one row per image and its classes as `"8|5|0"`. Every label is validated on the way
# in: an empty, non-integer or out-of-range class stops here with the image ID, not later in training.

# %%
# NBVAL_CHECK_OUTPUT
frame = competition.load_labels(DATA)
matrix = labels.label_matrix(frame["ID"], frame["Label"])
print(f"{len(frame)} training images, {matrix.sum():.0f} labels, {labels.N_CLASSES} classes")
frame.head()

# %% [markdown]
# ## How the classes are spread, and the weights that correct for it
# A few classes (Nucleoplasm, Cytosol) dominate and a few (Mitotic spindle, Aggresome) are rare. Keras's
# `class_weight` dict cannot weight multi-hot targets per class, so the loss instead weights each class's
# positives by negatives/positives, capped at 20: these are the bars on the right axis.

# %%
figures.saved(training_plots.class_distribution(matrix), OUT / "class_distribution")

# %%
# NBVAL_CHECK_OUTPUT
per_class = pd.DataFrame(
    {"images": labels.label_counts(matrix), "positive weight": labels.class_weights(matrix).round(2)},
    index=pd.Index(labels.LABEL_NAMES, name="class"),
)
print(per_class.to_string())

# %% [markdown]
# ## Labels per image, and which labels come together
# Most images carry one or two classes. "Negative" never comes with another class. The co-occurrence
# matrix shows which pairs a model will often see together (and may confuse).

# %%
charts.labels_per_image(matrix)

# %%
figures.saved(charts.label_cooccurrence(matrix, normalize=True), OUT / "label_cooccurrence")

# %% [markdown]
# ## Image sizes and bit depths
# The competition mixes 1728, 2048 and 3072 px images, 8- and 16-bit. The pipeline resizes every image
# to the training size and scales 16-bit values to the 0–255 scale, so all of them can share a batch.

# %%
survey_ids = frame["ID"] if SIZE_SURVEY_LIMIT is None else frame["ID"][:SIZE_SURVEY_LIMIT]
properties = charts.image_properties(DATA, survey_ids)
figures.saved(charts.image_sizes(properties), OUT / "image_sizes")

# %% [markdown]
# ## The four stains
# Red is microtubules, green the protein of interest (the channel the labels describe), blue the nucleus
# and yellow the endoplasmic reticulum. Each row is one image read through the project's own pipeline,
# its channels matched by image ID, so the panels of a row always belong together.

# %%
# NBVAL_CHECK_OUTPUT
dataset = pipeline.open_dataset(DATA, image_size=256, channels="rgby", with_id=True)
images, label_rows, ids = pipeline.take_images(dataset, N_PREVIEW)
print("batch:", images.shape, images.dtype, "| labels:", label_rows.shape, label_rows.dtype)

# %%
figures.saved(charts.channel_grid(images, label_rows, ids), OUT / "channels")

# %% [markdown]
# ## What we have
# - the data source every later notebook will use, and its layout;
# - the class counts and the per-class positive weights for the loss (skewed, with rare classes);
# - the label structure: mostly 1–2 labels per image, Negative alone, frequent pairs;
# - the size and bit-depth mix that the pipeline normalises;
# - a feel for each stain. Next: `02_augmentation` shows what training will do to these images.
