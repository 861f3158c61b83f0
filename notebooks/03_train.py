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
# - detect the accelerator and size the global batch;
# - build the model (sigmoid head, batch norm that follows Keras's training flag) and draw it;
# - plot the learning-rate schedule and the per-class positive weights of the loss;
# - train with validation, checkpoints, early stopping and re-estimated batch-norm statistics;
# - save the run and plot its history.

# %% tags=["parameters"]
DATA_DIR = ""  # empty: discover (HPA_DATA_DIR, then the competition data on Kaggle, then the default sample)
RUN_DIR = ""  # empty: <working dir>/run (/kaggle/working/run on Kaggle)
QUICK = None  # None: quick off Kaggle (tiny CNN, 64 px, 5 epochs), full on Kaggle
BACKBONE = None  # None: efficientnetb0 (full) / tiny (quick); also efficientnetb1..b7, efficientnetv2b0..b3, efficientnetv2s
WEIGHTS = None  # None: "imagenet" (full) / none (quick); or a weights file attached under /kaggle/input
IMAGE_SIZE = None  # None: 384 (full) / 64 (quick)
CHANNELS = None  # None: "rgb"; "rgby" adds the yellow ER stain as a 4th input channel
EPOCHS = None  # None: 20 (full) / 5 (quick)
BATCH_SIZE = None  # per replica; None: 16. The global batch is this x replicas

# %%
import hpa_nb  # first: it picks the Keras backend (JAX on a TPU VM) and quiets TensorFlow's C++ logs
from hpa_nb import accelerator, data, env, labels, model, plots, train

QUICK = (not env.on_kaggle()) if QUICK is None else QUICK
DATA = env.Path(DATA_DIR) if DATA_DIR else env.find_data().path
RUN = env.Path(RUN_DIR) if RUN_DIR else env.working_dir() / "run"
config = train.TrainConfig.make(QUICK, data_dir=str(DATA), out_dir=str(RUN), backbone=BACKBONE, weights=WEIGHTS,
                                image_size=IMAGE_SIZE, channels=CHANNELS, epochs=EPOCHS, batch_size=BATCH_SIZE)
print(config)

# %% [markdown]
# ## The accelerator
# On Kaggle's TPU v5e-8 the image ships TensorFlow for the CPU only, so `import hpa_nb` selects Keras's JAX
# backend and training runs data-parallel over the 8 chips, fed by `tf.data`. On GPUs it is
# `MirroredStrategy` (or JAX), on the CPU a single device. Mixed precision follows the device:
# bfloat16 on TPU, float16 on GPU, float32 on CPU.

# %%
# NBVAL_CHECK_OUTPUT
device = accelerator.detect(mixed_precision=config.mixed_precision)
global_batch = device.global_batch_size(config.batch_size)
print(f"backend {device.backend}, device {device.device_kind}, replicas {device.replicas}, "
      f"precision {device.precision}, global batch {global_batch}")

# %% [markdown]
# ## The held-out split
# Training holds out a multi-label stratified share of the images (every class with at least two images
# lands on both sides). `04_evaluate` reproduces this split from the saved config.

# %%
# NBVAL_CHECK_OUTPUT
frame = data.load_labels(DATA)
matrix = labels.label_matrix(frame["ID"], frame["Label"])
train_ids, val_ids = data.split(frame["ID"].tolist(), matrix, config.val_fraction, config.seed)
steps_per_epoch = config.steps_per_epoch or max(1, len(train_ids) // global_batch)
print(f"{len(train_ids)} training and {len(val_ids)} validation images, {steps_per_epoch} steps per epoch")

# %% [markdown]
# ## The model
# A backbone (EfficientNet, or a small CNN where no pretrained weights can be had), global average pooling,
# dropout and a `Dense(19, sigmoid)` head: one independent probability per class, as multi-label targets
# need (the baseline's softmax made the classes compete). The backbone is not forced into training mode,
# so batch norm uses its moving statistics at inference.

# %%
with device.scope():  # the architecture only: `train` below builds it again and loads the pretrained weights
    network = model.build(config.backbone, config.image_size, config.channels, weights=None, dropout=config.dropout)
network.summary()
print(f"{model.count_parameters(network):,} parameters")

# %%
plots.model_diagram(network, RUN / "model_diagram.png")

# %% [markdown]
# ## The learning-rate schedule
# A linear warmup from `initial_lr`, an optional sustain, then exponential decay per epoch. The peak is
# quoted for a global batch of 64 and scales linearly with the real global batch, so 8 TPU chips train
# with a proportionally larger step.

# %%
schedule = train.learning_rate_schedule(config, steps_per_epoch, global_batch)
plots.saved(plots.lr_schedule(schedule, config.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch), RUN / "lr_schedule")

# %% [markdown]
# ## Class weights that work for multi-label targets
# Keras's `class_weight` dict cannot weight multi-hot targets per class. Instead the binary cross-entropy
# weights each class's positives by negatives / positives (capped at 20), computed on the training split.

# %%
train_rows = frame["ID"].isin(train_ids).to_numpy()
plots.class_distribution(matrix[train_rows], max_weight=config.max_positive_weight)

# %% [markdown]
# ## Training
# `fit` validates on the held-out split after every epoch and checkpoints each epoch (a killed run resumes
# with `python -m hpa_nb train --resume`). Early stopping watches the validation macro AUC and restores
# the best weights. Before each validation, batch-norm statistics are re-estimated over training batches,
# so the saved model predicts as well in inference mode as it did while training.

# %%
result = train.train(config)

# %%
# NBVAL_CHECK_OUTPUT
print("saved:", sorted(path.name for path in RUN.iterdir() if path.suffix in {".keras", ".csv", ".json"}))

# %%
print({name: round(value, 3) for name, value in result.final.items()})

# %% [markdown]
# ## Training history
# Loss and macro AUC per epoch, on the training batches and on the held-out split.

# %%
plots.saved(plots.training_history(result.history), RUN / "training_history")

# %% [markdown]
# ## What we have
# - a trained model in `model.keras` (in `/kaggle/working/run` on Kaggle), with `config.json`, `history.csv`,
#   `split.csv` and per-epoch checkpoints;
# - validation scores of the saved model in inference mode;
# - the schedule, weights and history plots. Next: `04_evaluate` scores the held-out split class by class.
