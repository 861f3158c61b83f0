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
# # 05 · From image labels to a cell-level submission
#
# **Purpose:** the competition scores cells, not images. Segment every cell, give each one a confidence for
# each of the 19 classes, score that locally the way Kaggle does, and write `submission.csv`.
# **Accelerator:** none (CPU; Kaggle runs submission notebooks with internet off). **Runtime:** about 30 s on
# the default sample (measured, 2 CPU cores). Classical segmentation took about 1.1 s per image at 2048 px here,
# so the 559 test images should take roughly 15–25 minutes with the model's predictions (an estimate);
# HPA-Cell-Segmentation took 16–22 s per 2048 px image on these 2 cores, so about 3 hours on a CPU.
#
# In this notebook we will:
# - find every image run attached (`03_train`, and its fold kernels), and every cell run of `07_cell_train` (on
#   Kaggle, their outputs wherever Kaggle mounted them), average each kind into one ensemble, and say which models and
#   which rule score the cells;
# - segment every test image once and score each of its cells;
# - overlay the cells found on a few images, next to the sample's true cells, with each cell's top classes;
# - measure the local cell mAP (mask IoU ≥ 0.6, the competition's metric) on held-out images;
# - write `submission.csv` in the competition format and check that it decodes.

# %% tags=["parameters"]
DATA_DIR = ""  # empty: discover (HPA_DATA_DIR, then the competition data on Kaggle, then the default sample)
RUN_DIR = ""  # empty: on Kaggle every image run attached (03_train, its fold kernels); elsewhere <working dir>/run.
# Or folders / OWNER/KERNEL references, comma-separated. Several runs are averaged (an ensemble).
CELL_RUN_DIR = ""  # empty: every cell run attached (07_cell_train; elsewhere <working dir>/cell_run if there); "none": image runs alone
QUICK = True  # off Kaggle only: the size of the image run trained first when there is none (on Kaggle none is trained)
SEGMENTATION = "auto"  # hpacellseg when its offline folder is attached (docs/kaggle.md), else classical; or name one
IMAGE_WEIGHT = 0.7  # image run alone: cell score = IMAGE_WEIGHT * image prob. + (1 - IMAGE_WEIGHT) * cell-crop prob.
PARTIAL_SCALE = 1.0  # scores of cells cut off by the image's edge x this (the hosts' advice is 0); 07 measures both
CAM_WEIGHT = 0.0  # the CAM cell score's weight (the image model's class maps inside each cell), from the cell term's
RULE_FILE = ""  # a rule tuned by `compare --out` (attached or local): its weights replace the three above
TTA = False  # average every image, crop and tile over the 8 flips and rotations (8x the model time)
WORKERS = None  # processes that segment and cut the test images; None: every core (4 in a Kaggle CPU session)
N_PREVIEW = 3

# %%
import pandas as pd

import hpa_nb  # first: it picks the Keras backend and quiets TensorFlow's C++ logs
from hpa_nb.cells import scoring, submit
from hpa_nb.core import env
from hpa_nb.plots import cells as cell_plots
from hpa_nb.plots import figures
from hpa_nb.sample import sources
from hpa_nb.segmentation import offline as hpacellseg_offline
from hpa_nb.training import inputs, train

DATA = env.Path(DATA_DIR) if DATA_DIR else sources.find_data().path
RUNS = inputs.find_all("image_run", RUN_DIR, consumer="05_submission", required=env.on_kaggle()) or [
    train.image_run(consumer="05_submission", quick=QUICK)
]  # off Kaggle, with none there: a quick one
CELL_RUNS = (
    []
    if CELL_RUN_DIR == "none"
    else inputs.find_all("cell_run", CELL_RUN_DIR, consumer="05_submission", required=False)
)
classifier = scoring.load_ensemble(RUNS, tta=TTA)
cell_model = scoring.load_ensemble(CELL_RUNS, level="cell", tta=TTA) if CELL_RUNS else None
rule = (
    submit.load_rule(RULE_FILE)
    if RULE_FILE
    else submit.choose_rule(cell_model is not None, IMAGE_WEIGHT, PARTIAL_SCALE, cam_weight=CAM_WEIGHT)
)
test_ids = submit.read_submission_ids(DATA)
print(f"{len(test_ids)} test images; " + submit.describe_scoring(RUNS, CELL_RUNS, rule) + ("; TTA x8" if TTA else ""))
if SEGMENTATION == "auto":
    SEGMENTATION, why = hpacellseg_offline.choose_segmentation()
    print(why)
print(submit.accelerator_note(SEGMENTATION) or f"segmentation: {SEGMENTATION}")

# %% [markdown]
# ## Cells, found without downloads, and scored
# The competition's cells were drawn by the hosts' HPA-Cell-Segmentation, so this notebook uses it whenever
# its offline folder (its code, its fork's code and its two weight files: see docs/kaggle.md) is
# attached as a dataset, and says so above. Without it, the segmentation is classical: nuclei from the blue
# stain (smoothing, Otsu threshold, distance-transform watershed), then each cell grown from its nucleus by
# a watershed on red + yellow.
# Every test image is segmented once, here, and each of its cells scored under `rule`: with a cell run,
# the image × cell rule (`image ** 0.3 * cell ** 0.7`, the cell term the cell model's score of the cell's
# tile); with the image run alone, the image-level probabilities blended with the cell shown alone. The
# overlays, the local score and the submission below all reuse these cells. (The masks stay in memory at
# full size: 8 MiB per 2048 px image.)

# %%
predictions = scoring.predict_images(
    classifier, DATA, test_ids, method=SEGMENTATION, rule=rule, cell_model=cell_model, workers=WORKERS
)

# %% [markdown]
# White outlines are the cells found; on the sample, cyan outlines are the true cells. Underneath, each
# cell's two most likely classes.

# %%
preview = {image_id: predictions[image_id] for image_id in test_ids[:N_PREVIEW]}
figures.saved(cell_plots.overlay_figure(DATA, preview), env.working_dir() / "05_submission" / "cell_overlays")

# %% [markdown]
# ## How well the cells match
# A found cell matches a true one when their masks overlap with IoU ≥ 0.6, the threshold at which the
# competition counts a prediction, so the matched IoU should sit well above that. (Only the synthetic
# sample has true masks; on the competition data this cell reports that there are none.)

# %%
has_truth = (DATA / "masks").is_dir()
if has_truth:
    scored = submit.score_cells(predictions, DATA)

# %%
# NBVAL_CHECK_OUTPUT
print(scored.segmentation if has_truth else "no ground-truth masks here")

# %% [markdown]
# ## The local cell mAP, in both readings
# Each class's average precision over cells (a predicted cell counts when it overlaps a true cell of that
# class with IoU ≥ 0.6), averaged over classes: the competition's metric, computed on held-out images with
# true cells. Kaggle calls it identical to the OpenImages Instance Segmentation Challenge evaluation, which
# can be read two ways, and which one Kaggle's scorer used is not public. The **challenge** reading follows
# the OpenImages Challenge evaluator (as the hosts' own re-scoring runs it): a class counts only on images
# whose cells carry it, so predicting a class an image lacks costs nothing. The **all classes** reading
# counts every prediction, so such a class is a false positive. Scoring the true masks too separates
# segmentation error from classification error.

# %%
if has_truth:
    oracle_masks = submit.evaluate_cells(
        classifier,
        DATA,
        ids=test_ids,
        rule=rule,
        use_truth_masks=True,
        progress=False,
        cell_model=cell_model,
        workers=WORKERS,
    )
    print(scored.describe())
    print("with the true cell masks:", oracle_masks.describe())
    display(scored.table().sort_values("AP (challenge)").head(5))

# %% [markdown]
# ## Writing the submission
# One row per test image: `ID,ImageWidth,ImageHeight,PredictionString`, with the original PNG size and one
# `label confidence mask` triplet per cell and class. Masks are COCO run-length encoded, zlib-compressed
# and base64-encoded, as the competition requires. On Kaggle the file lands in `/kaggle/working`.

# %%
path = submit.write_predictions(predictions, env.working_dir() / "submission.csv")
submission = pd.read_csv(path, keep_default_na=False)
submission.assign(PredictionString=submission["PredictionString"].str.slice(0, 60) + "…").head()

# %% [markdown]
# Every mask in the file should decode back to a cell of the right size; check one image.

# %%
# NBVAL_CHECK_OUTPUT
row = submission.iloc[0]
decoded = submit.parse_prediction_string(row["PredictionString"], row["ImageHeight"], row["ImageWidth"])
print(f"{len(submission)} rows for {len(test_ids)} test images; every ID present:", list(submission["ID"]) == test_ids)
print(
    f"first image: {len(decoded) // 19} cells x 19 classes, masks of shape {decoded[0][2].shape}"
    if decoded
    else "first image: no cells"
)

# %% [markdown]
# ## What we have
# - a cell segmentation (classical, or the hosts' tool when attached), checked against the sample's true cells;
# - per-cell class confidences from every model attached, under a documented rule (`hpa_nb.cells.scoring.ScoreRule`);
# - the local cell mAP, the competition's metric, to compare methods offline;
# - `submission.csv` in the competition format, ready to submit from this notebook's output on Kaggle.
