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
# # 04 · Evaluating on images the model never saw
#
# **Purpose:** measure how good the trained model is, per class, on the held-out split that training set
# aside (never on the training images, which is the baseline's mistake), and see where it is weak.
# **Accelerator:** none needed (CPU is fine; a GPU or TPU is faster with `--tta`). **Runtime:** about 20 s on
# the default sample (measured, 2 CPU cores); an estimated 10 minutes for 4,400 held-out images at 384 px on CPU.
#
# In this notebook we will:
# - find the run that `03_train` saved: on Kaggle its attached output, wherever Kaggle mounted it (elsewhere
#   `out/run`, trained quickly first if there is none);
# - predict the held-out split, reproduced from the run's saved config;
# - report per-class ROC AUC, average precision and F1, with macro and micro averages;
# - plot per-class scores and precision–recall curves;
# - look at predictions next to their images, and see where the model looks (class activation maps);
# - name the weakest classes.

# %% tags=["parameters"]
DATA_DIR = ""  # empty: the data the run was trained on, found again here (the competition wherever it is mounted)
RUN_DIR = ""  # empty: on Kaggle the attached output of 03_train; elsewhere <working dir>/run. Or a folder, OWNER/KERNEL
QUICK = True  # off Kaggle only: the size of the run trained first when there is none (on Kaggle none is trained)
TTA = False  # average over the 8 flips and rotations (8x the prediction time)
N_EXAMPLES = 8
N_CLASS_MAPS = 4  # held-out images whose class activation maps are drawn

# %%
import hpa_nb  # first: it picks the Keras backend and quiets TensorFlow's C++ logs
from hpa_nb.cells import cam
from hpa_nb.core import env
from hpa_nb.data import competition, pipeline
from hpa_nb.plots import cells as cell_plots
from hpa_nb.plots import charts, figures
from hpa_nb.training import evaluate, inputs, run, train

RUN = train.image_run(RUN_DIR, consumer="04_evaluate", quick=QUICK)
config = run.load_config(RUN)
DATA = inputs.run_data(RUN, DATA_DIR)
print(
    f"run: {config.model.backbone} at {config.data.image_size} px, {config.data.channels}, trained on {env.Path(config.data.data_dir).name}"
)

# %% [markdown]
# ## Held-out predictions and metrics
# `split="val"` re-derives the held-out IDs from the run's seed and validation fraction and checks them
# against the `split.csv` that training wrote, so these are exactly the images training never used.
# F1 is scored at a per-class threshold tuned on these same images, so read it as optimistic; AUC and AP
# need no threshold.

# %%
OUT = env.working_dir() / "04_evaluate"
result = evaluate.evaluate(RUN, DATA, out_dir=OUT, split="val", tta=TTA)
print(evaluate.format_table(result.metrics))

# %%
# NBVAL_CHECK_OUTPUT
print(
    f"{len(result.ids)} held-out images, all of them outside the training split:",
    set(result.ids).isdisjoint(run.load_split(RUN)["train"]),
)

# %% [markdown]
# ## Per class, at a glance
# Bars show each class's ROC AUC and average precision; classes absent from the held-out images are
# marked, not scored as 0.5.

# %%
charts.per_class_scores(result.metrics)

# %% [markdown]
# ## Precision–recall curves
# For rare classes, precision–recall says more than ROC: a curve that falls early means confident false
# positives.

# %%
charts.precision_recall_curves(result.y_true, result.y_score)

# %% [markdown]
# ## Predictions next to their images
# Titles show the true labels and the top predicted classes with their probabilities (✓ where right).

# %%
dataset = pipeline.open_dataset(
    DATA, image_size=256, channels=config.data.channels, with_id=True, ids=result.ids[:N_EXAMPLES]
)
images, label_rows, ids = pipeline.take_images(dataset, N_EXAMPLES)
rows = [result.ids.index(image_id) for image_id in ids]
figures.saved(charts.prediction_grid(images, label_rows, result.y_score[rows], ids), OUT / "sample_predictions")

# %% [markdown]
# ## Where the model looks: class activation maps
# The head is global average pooling then one dense layer, so each class's score is the average over the image of a
# map: the backbone's last features weighted by that class's dense weights (CAM, exact, no gradients). Bright where
# the class's evidence is. For each image: the true classes (black titles) and the two strongest classes it lacks
# (red), each with the image-level probability. Pooled inside a cell's mask, the same map gives that cell's CAM
# score, the third way to score cells beside the image and cell models (`python -m hpa_nb compare` measures it).

# %%
labels = dict(zip(*competition.load_labels(DATA)[["ID", "Label"]].to_numpy().T))
views = cam.class_map_views(
    run.load_model(RUN), config.data.image_size, config.data.channels, DATA, result.ids[:N_CLASS_MAPS], labels
)
figures.saved(cell_plots.class_map_figure(views), OUT / "class_maps")

# %% [markdown]
# ## Where the model is weak
# The classes with the lowest average precision are where to look first: more data, a larger input size,
# the yellow channel (`rgby`), or a pretrained backbone usually help most.

# %%
table = result.table()
weakest = table.dropna(subset=["average_precision"]).sort_values("average_precision").head(4)
weakest

# %% [markdown]
# ## What we have
# - held-out predictions in `predictions.csv` and every score in `metrics.json` (in the working dir);
# - per-class AUC/AP bars and precision–recall curves;
# - example predictions with their images, and the class maps of a few;
# - the weakest classes, the first place to improve. Next: `05_submission` turns image-level predictions
#   into cell-level ones and writes a competition submission.
