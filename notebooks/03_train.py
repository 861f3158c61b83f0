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
# # 03 · Training a multi-label classifier (TPU v5e-8, GPU or CPU)
#
# **Purpose:** train an image-level classifier for the 19 localisation classes on whatever accelerator
# the notebook finds, validate it on a held-out split every epoch, and save it for `04_evaluate` and
# `05_submission`.
# **Accelerator:** Kaggle TPU v5e-8 (Keras 3 on JAX, data-parallel over 8 chips); a GPU or the CPU also work.
# **Runtime:** about 1 minute for the quick model on the default sample (measured, 2 CPU cores); an estimated
# 2–3 hours for 20 epochs of EfficientNetB0 at 384 px on the full data on a v5e-8 (not measured here).
#
# In this notebook we will:
# - check, before anything is spent, that a full Kaggle run has the competition data and an accelerator;
# - prepare the run once: accelerator, held-out split, data pipelines, learning-rate schedule and model;
# - look at the model, the schedule and the class weights of the loss;
# - call `fit`: validation, history and a checkpoint every epoch, early stopping, re-estimated batch-norm statistics;
# - plot the history of the saved run.

# %% tags=["parameters"]
DATA_DIR = ""  # empty: discover (HPA_DATA_DIR, then the competition data on Kaggle, then the default sample)
RUN_DIR = ""  # empty: <working dir>/run (/kaggle/working/run on Kaggle)
RESUME_FROM = ""  # a killed run to continue: its folder, or OWNER/KERNEL of an earlier version attached as input
SHARDS = ""  # compact shards from 00_prepare: a folder or OWNER/KERNEL attached; empty: on Kaggle any attached
QUICK = None  # None: quick off Kaggle (tiny CNN, 64 px, 5 epochs), full on Kaggle
BACKBONE = None  # None: efficientnetb0 (full) / tiny (quick); also efficientnetb1..b7, efficientnetv2b0..b3, v2s,
# or a KerasHub preset: kaggle://OWNER/MODEL/keras/VARIATION (internet off: attach it, `kaggle push --model`), or a folder
WEIGHTS = None  # None: "imagenet" (full) / none (quick); or a weights file attached under /kaggle/input
IMAGE_SIZE = None  # None: 384 (full) / 64 (quick)
CHANNELS = None  # None: "rgb"; "rgby" adds the yellow ER stain as a 4th input channel
EPOCHS = None  # None: 20 (full) / 5 (quick)
BATCH_SIZE = None  # per replica; None: 16. The global batch is this x replicas
FOLDS = None  # K-fold training: None, one split by the validation fraction; K, fold FOLD of K stratified folds held out
FOLD = 0  # the fold held out (0..FOLDS-1); push one version per fold (`kaggle push 03_train --fold k`)
EXTRA_DATA = []  # more folders in the competition layout (e.g. public HPA images attached as a dataset), trained on only
ALLOW_SAMPLE_DATA = False  # on Kaggle a full run refuses the synthetic sample unless this is True
ALLOW_CPU = False  # on Kaggle a full run refuses to train on a CPU unless this is True
HOURS = 8.0  # on Kaggle, stop after the epoch in hand once the next would end past this (a TPU session ends at 9 h)
TRACK = False  # True: install wandb here (internet on) and log to Weights & Biases with a WANDB_API_KEY Kaggle secret

# %%
import time

import hpa_nb  # first: it picks the Keras backend (JAX on a TPU VM) and quiets TensorFlow's C++ logs
from hpa_nb.core import env
from hpa_nb.plots import figures
from hpa_nb.plots import training as training_plots
from hpa_nb.sample import sources
from hpa_nb.training import run, tracking, train

if TRACK:
    tracking.install()
QUICK = (not env.on_kaggle()) if QUICK is None else QUICK
DATA = env.Path(DATA_DIR) if DATA_DIR else sources.find_data().path
RUN = env.Path(RUN_DIR) if RUN_DIR else run.default_dir()
config = train.TrainConfig.make(
    QUICK,
    data_dir=str(DATA),
    out_dir=str(RUN),
    backbone=BACKBONE,
    weights=WEIGHTS,
    image_size=IMAGE_SIZE,
    channels=CHANNELS,
    epochs=EPOCHS,
    batch_size=BATCH_SIZE,
    folds=FOLDS,
    fold=FOLD if FOLDS else None,
    extra_data=list(EXTRA_DATA) or None,
    resume_from=RESUME_FROM or None,
    shards=SHARDS or None,
    allow_sample_data=ALLOW_SAMPLE_DATA,
    allow_cpu=ALLOW_CPU,
    deadline=time.time() + HOURS * 3600 if env.on_kaggle() else None,
)
print(config)

# %% [markdown]
# ## The plan
# `prepare` first checks what would waste a Kaggle session: a full run stops here, in seconds, if the
# competition data is not attached (it would otherwise train on the synthetic sample) or if the session
# has only a CPU (Kaggle gives one to accounts without identity verification). It prints the library
# versions, then builds everything `fit` needs, once. On Kaggle's TPU v5e-8 the image ships TensorFlow
# for the CPU only, so `import hpa_nb` selected Keras's JAX backend and training runs data-parallel over
# the 8 chips, fed by `tf.data`. Mixed precision follows the device: bfloat16 on TPU, float16 on GPU,
# float32 on CPU. The held-out split is multi-label stratified (every class with at least two images
# lands on both sides); `04_evaluate` reproduces it from the saved config. The summary's `data:` line
# says where the images come from: on Kaggle, the compact shards of an attached `00_prepare` output
# (or the ones `SHARDS` names), checked image by image against the competition's `train.csv`; without
# them, the competition's TFRecords, which the TPU host decodes at full size every epoch.

# %%
plan = train.prepare(config)
print(plan.summary())
FIGURES = RUN if plan.hosts.writer else env.working_dir()  # on a TPU pod slice host 0 alone writes the run folder

# %%
# NBVAL_CHECK_OUTPUT
device = plan.accelerator
print(
    f"backend {device.backend}, device {device.device_kind}, replicas {device.replicas}, "
    f"precision {device.precision}, global batch {plan.global_batch}"
)
print(
    f"{len(plan.train_ids)} training and {len(plan.val_ids)} validation images, {plan.steps_per_epoch} steps per epoch"
)

# %% [markdown]
# ## The model
# A backbone (EfficientNet, or a small CNN where no pretrained weights can be had), global average pooling,
# dropout and a `Dense(19, sigmoid)` head: one independent probability per class, as multi-label targets
# need (the baseline's softmax made the classes compete). The backbone is not forced into training mode,
# so batch norm uses its moving statistics at inference. The diagram is visualkeras's where it is installed;
# Kaggle's TPU image lacks it, and there the backbone's shape profile is drawn with matplotlib.

# %%
plan.model.summary()

# %%
training_plots.model_diagram(plan.model, FIGURES / "model_diagram.png")

# %% [markdown]
# ## The learning-rate schedule
# A linear warmup from `initial_lr`, an optional sustain, then exponential decay per epoch. The peak is
# quoted for a global batch of 64 and scales linearly with the real global batch, so 8 TPU chips train
# with a proportionally larger step.

# %%
figures.saved(
    training_plots.lr_schedule(
        plan.schedule, config.optimisation.epochs * plan.steps_per_epoch, steps_per_epoch=plan.steps_per_epoch
    ),
    FIGURES / "lr_schedule",
)

# %% [markdown]
# ## Class weights that work for multi-label targets
# Keras's `class_weight` dict cannot weight multi-hot targets per class. Instead the binary cross-entropy
# weights each class's positives by negatives / positives (capped at 20), computed on the training split.

# %%
training_plots.class_distribution(plan.train_labels, max_weight=config.optimisation.max_positive_weight)

# %% [markdown]
# ## Training
# `fit` is Keras's `model.fit` over the plan: it validates on the held-out split after every epoch, writes
# the epoch's row of `history.csv` and then a checkpoint, stops early on the validation macro AUC (restoring
# the best weights) and re-estimates batch-norm statistics before each validation, so the saved model
# predicts as well in inference mode as it did while training. Once a quarter of the first epoch has run, it
# prints the whole run's projected time and how many versions of `HOURS` that is. On Kaggle it stops at `HOURS`
# after the epoch in hand, so the version ends with its output saved rather than being cut off at 9 h; push
# again with `python -m hpa_nb kaggle push 03_train --resume-from OWNER/hpa-03-train`: the next version attaches
# this one's output and continues after its last checkpoint, with the same data stream.

# %%
result = train.fit(plan)
print(run.unfinished(RUN) or f"finished: {len(result.history)} epochs")

# %%
# NBVAL_CHECK_OUTPUT
print("saved:", sorted(path.name for path in RUN.iterdir() if path.suffix in {".keras", ".csv", ".json"}))

# %%
print({name: round(value, 3) for name, value in result.final.items()})
if (
    QUICK and DATA == sources.default_sample_dir() and EPOCHS is None
):  # the docs' figures come from this run: CI fails here if it learned nothing
    assert result.final["val_auc"] > 0.62, f"the quick model is near chance: {result.final}"

# %% [markdown]
# ## Training history
# Loss and macro AUC per epoch, on the training batches and on the held-out split.

# %%
figures.saved(training_plots.training_history(result.history), FIGURES / "training_history")

# %% [markdown]
# ## What we have
# - a trained model in `model.keras` (in `/kaggle/working/run` on Kaggle), with `config.json`, `history.csv`,
#   `split.csv` and per-epoch checkpoints, from which a killed session resumes;
# - validation scores of the saved model in inference mode;
# - the schedule, weights and history plots. Next: `04_evaluate` scores the held-out split class by class.
