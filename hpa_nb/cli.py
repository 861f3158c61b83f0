"""``python -m hpa_nb <verb>``: one thin subcommand per job, each over a library function.

Parsing is cheap: this module and the constants its options read (`hpa_nb.cells.rules`, `hpa_nb.training.config`,
`hpa_nb.sample.specs`, ...) load no TensorFlow, Keras or JAX, so ``--help``, a bad argument and the verbs that
train nothing answer at once. Each parser names its handler as ``"module:function"`` under `hpa_nb.commands`, and
`main` imports that module only when its verb runs (pip's ``create_command`` works the same way): the one place
in the package that imports its own modules on demand. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

from hpa_nb.cells.rules import COMBINED_RULE, COMBINERS, CROP_KINDS, NEGATIVE_RULES, ScoreRule
from hpa_nb.core import log
from hpa_nb.core.chain import MACHINES
from hpa_nb.core.labels import CHANNEL_SETS
from hpa_nb.sample.specs import DEFAULT_SAMPLE
from hpa_nb.segmentation.backends import SEGMENTERS
from hpa_nb.training.config import LEVELS, LOSSES, DataSettings

EXIT_USER_ERROR = 2
BENCH_KINDS = ("loader", "train", "cells")  # `hpa_nb.commands.bench.BENCHES` runs them


def _sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="write an HPA-like synthetic data set in the competition layout")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--images", type=int, default=DEFAULT_SAMPLE["images"], help="training images")
    p.add_argument("--test-images", type=int, default=DEFAULT_SAMPLE["test_images"])
    p.add_argument("--size", type=int, default=DEFAULT_SAMPLE["size"], help="largest image side in px")
    p.add_argument("--seed", type=int, default=DEFAULT_SAMPLE["seed"])
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=DEFAULT_SAMPLE["bit_depth"])
    p.set_defaults(handler="hpa_nb.commands.sample:main")


def _hpacellseg_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hpacellseg-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="for --segmentation hpacellseg: the folder with its weights (nuclei-model.pth, "
        "cell-model.pth) and sources (`kaggle hpacellseg-dataset` lays it out; default: "
        "$HPA_CELLSEG_DIR, /kaggle/input on Kaggle, else the current folder)",
    )


def _workers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that read, segment and cut the images (default: every core this process may use)",
    )


def _shard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="write compact training shards (one uint8 record per image)")
    p.add_argument("--src", default=None, help="data folder in the competition layout (default: discovered)")
    p.add_argument("--out", type=Path, default=None, help="shard folder (default: SRC/shards, where readers look)")
    p.add_argument("--size", type=int, default=512, help="image side in px, resized once")
    p.add_argument("--channels", choices=tuple(CHANNEL_SETS), default="rgby")
    p.add_argument(
        "--encoding",
        choices=("raw", "png"),
        default="raw",
        help="raw: fastest to read; png: smaller on disk (raw rgby 512 px is 1 MiB an image)",
    )
    p.add_argument("--images-per-shard", type=int, default=None, help="default: about 150 MB per shard")
    p.add_argument(
        "--max-gb",
        type=float,
        default=None,
        help="stop as soon as the projected total exceeds this (Kaggle's /kaggle/working holds 20 GB)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip bad images with a warning instead of stopping")
    p.set_defaults(handler="hpa_nb.commands.data:shard")


def _tiles_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiles", help="write cell tiles (one uint8 record per cell, other cells masked out)")
    p.add_argument("--src", default=None, help="data folder in the competition layout (default: discovered)")
    p.add_argument("--out", type=Path, default=None, help="tile folder (default: SRC/tiles)")
    p.add_argument("--size", type=int, default=128, help="tile side in px")
    p.add_argument("--channels", choices=tuple(CHANNEL_SETS), default="rgby")
    p.add_argument(
        "--segmentation",
        choices=("classical", "hpacellseg", "masks"),
        default="classical",
        help="where the cells come from; masks: the sample's true cells (masks/{ID}.png)",
    )
    _hpacellseg_option(p)
    p.add_argument(
        "--encoding",
        choices=("raw", "png"),
        default="raw",
        help="raw: fastest to read; png: smaller on disk (what fits the full set in /kaggle/working)",
    )
    p.add_argument("--images-per-file", type=int, default=None, help="default: about 150 MB per file")
    p.add_argument("--skip-bad", action="store_true", help="skip bad images with a warning instead of stopping")
    _workers_option(p)
    p.set_defaults(handler="hpa_nb.commands.data:tiles")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a multi-label classifier and write a run folder",
        description="Options left out take the TrainConfig defaults, or the quick values with "
        "--quick; options given always win (--quick --epochs 1).",
    )
    p.add_argument(
        "--data",
        default=None,
        nargs="+",
        metavar="FOLDER",
        help="data folder (default: discovered; off Kaggle the default sample); more folders in the "
        "competition layout are extra sources, only trained on (their IDs must not collide)",
    )
    p.add_argument("--out", type=Path, default=None, help="run folder (default: out/run, /kaggle/working/run)")
    p.add_argument("--folds", type=int, help="K-fold training: K multi-label stratified folds, --fold held out")
    p.add_argument("--fold", type=int, help="the fold held out (0..K-1) with --folds")
    p.add_argument("--quick", action="store_true", help="tiny CNN from scratch, 64 px, 5 epochs: CI and smoke runs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    p.add_argument(
        "--resume-from",
        metavar="RUN_OR_KERNEL",
        help="copy a killed run (a folder, or OWNER/KERNEL[/VERSION] attached under /kaggle/input) into "
        "--out and continue it there",
    )
    p.add_argument(
        "--shards",
        help="compact shards written elsewhere (a folder, or OWNER/KERNEL[/VERSION] attached "
        "under /kaggle/input), paired with --data's train.csv (default: DATA/shards)",
    )
    p.add_argument(
        "--level",
        choices=LEVELS,
        help="image (default): whole images; cell: cell tiles with their "
        "image's label as a weak target, split by image",
    )
    p.add_argument(
        "--tiles",
        help="cell tiles for --level cell (a folder, or OWNER/KERNEL attached under "
        "/kaggle/input; default: DATA/tiles)",
    )
    p.add_argument(
        "--relabel",
        action="store_true",
        default=None,
        help="--level cell: train on targets relabelled from out-of-fold cell models (hpa_nb.cells.relabel) "
        "instead of each cell's image label",
    )
    p.add_argument("--split-from", metavar="RUN", help="use the split of this run folder (or split CSV)")
    p.add_argument("--image-size", type=int, help="square input side in px")
    p.add_argument("--channels", choices=tuple(CHANNEL_SETS))
    p.add_argument("--backbone", help="efficientnetb0..b7, efficientnetv2b0..b3, efficientnetv2s or tiny")
    p.add_argument("--weights", help="imagenet, none, or a backbone weights file (.h5 / .weights.h5)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per replica; the global batch is this x replicas")
    p.add_argument("--steps-per-epoch", type=int, help="default: one pass over the training split")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-lr", type=float, help="peak learning rate for a global batch of 64 (scaled linearly)")
    p.add_argument("--loss", choices=LOSSES)
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs (on val_auc)")
    p.add_argument("--precision", help="Keras dtype policy, e.g. float32 or mixed_bfloat16 (default: by device)")
    p.add_argument("--steps-per-execution", type=int, help="steps per compiled call (default: 32 TPU, 8 GPU, 1 CPU)")
    p.add_argument(
        "--allow-sample-data",
        action="store_true",
        default=None,
        help="on Kaggle, let a full run train on the synthetic sample",
    )
    p.add_argument("--allow-cpu", action="store_true", default=None, help="on Kaggle, let a full run train on a CPU")
    p.add_argument(
        "--hours",
        type=float,
        help="stop after the epoch in hand once the next would end past this many "
        "hours from now (resume later with --resume); default: no limit",
    )
    several = p.add_argument_group("several hosts (a TPU pod slice is found by itself; see docs/pod-slice.md)")
    several.add_argument("--coordinator", metavar="ADDRESS:PORT", help="host 0's address, the same on every host")
    several.add_argument("--num-processes", type=int, metavar="N", help="how many hosts train together")
    several.add_argument("--process-id", type=int, metavar="K", help="this host's number, 0..N-1 (0 writes the run)")
    p.set_defaults(handler="hpa_nb.commands.train:main")


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a training run on held-out images: predictions.csv, metrics.json, plots")
    p.add_argument(
        "--model",
        type=Path,
        nargs="+",
        required=True,
        metavar="RUN",
        help="training run folder (model.keras, config.json, split.csv); several: their average",
    )
    p.add_argument("--weights", type=float, nargs="+", default=None, help="the runs' weights (default equal)")
    p.add_argument("--data", help="labelled competition-layout folder (default: the run's data_dir from config.json)")
    p.add_argument("--out", type=Path, default=None, help="folder to write (default: RUN/eval_SPLIT)")
    p.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="val: the run's held-out images (default); all: every image in the folder's train.csv",
    )
    p.add_argument("--tta", action="store_true", help="average predictions over the 8 flips and rotations (8x work)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's batch size)")
    p.add_argument(
        "--thresholds",
        type=Path,
        default=None,
        metavar="METRICS_JSON",
        help="score F1 at the per-class thresholds of an earlier evaluation "
        "(e.g. RUN/eval_val/metrics.json) instead of tuning them on these images",
    )
    p.set_defaults(handler="hpa_nb.commands.evaluate:evaluate")


def _folds_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("folds", help="gather fold runs' held-out predictions into out-of-fold figures")
    p.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="the runs of every fold (train --folds K --fold k); several of one fold are averaged",
    )
    p.add_argument("--data", default=None, help="their labelled data folder (default: the first run's)")
    p.add_argument("--out", type=Path, default=None, help="write the out-of-fold predictions here (predictions.csv)")
    p.set_defaults(handler="hpa_nb.commands.evaluate:folds")


def _submit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="segment the test images, score each cell and write submission.csv")
    p.add_argument(
        "--model",
        type=Path,
        nargs="+",
        required=True,
        metavar="RUN",
        help="training run folder (model.keras, config.json); several: their average (an ensemble)",
    )
    p.add_argument(
        "--cell-model",
        type=Path,
        nargs="+",
        default=None,
        metavar="CELL_RUN",
        help="a cell run folder (train --level cell), or several: each cell's score combines the image "
        "model's image-level score with this model's score of the cell's tile (default rule: "
        f"geometric, image weight {COMBINED_RULE.image_weight})",
    )
    p.add_argument("--weights", type=float, nargs="+", default=None, help="the image runs' weights (default equal)")
    p.add_argument("--cell-weights", type=float, nargs="+", default=None, help="the cell runs' weights (default equal)")
    p.add_argument("--tta", action="store_true", help="average every image, crop and tile over 8 flips and rotations")
    p.add_argument(
        "--rule",
        type=Path,
        default=None,
        metavar="RULE_JSON",
        help="the rule `compare --out` tuned (its weights and edge scale); options given still win",
    )
    p.add_argument(
        "--cam-weight",
        type=float,
        default=None,
        help="weight of the CAM cell score (the image model's class maps inside each cell), taken from "
        "the cell term's (default 0)",
    )
    p.add_argument(
        "--data", help="competition-layout folder with test/ and sample_submission.csv (default: discovered)"
    )
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: WORKING_DIR/submission.csv)")
    p.add_argument("--segmentation", choices=tuple(SEGMENTERS), default="classical")
    _hpacellseg_option(p)
    p.add_argument(
        "--combine",
        choices=tuple(COMBINERS),
        default=None,
        help=f"how image-level and cell-crop probabilities are combined (default {ScoreRule.combine}, "
        f"with --cell-model {COMBINED_RULE.combine})",
    )
    p.add_argument(
        "--image-weight",
        type=float,
        default=None,
        help=f"weight of the image-level probability, 0..1 (default {ScoreRule.image_weight}, with "
        f"--cell-model {COMBINED_RULE.image_weight})",
    )
    p.add_argument(
        "--partial-scale",
        type=float,
        default=None,
        help="multiply the scores of cells cut off by the image edge (touching it, under half the "
        "median cell area) by this; 1 (default) leaves them",
    )
    p.add_argument(
        "--crop",
        choices=CROP_KINDS,
        default=None,
        help=f"a cell shown in the whole image's frame, or its own square crop (default {ScoreRule.crop})",
    )
    p.add_argument(
        "--negative",
        choices=tuple(NEGATIVE_RULES),
        default=None,
        help="Negative = max(Negative, 1 - max other) ('complement') or as predicted",
    )
    p.add_argument("--confidence-floor", type=float, default=0.0, help="omit a cell's classes scoring below this")
    p.add_argument("--batch-size", type=int, default=32, help="cell crops per classifier batch")
    _workers_option(p)
    p.set_defaults(handler="hpa_nb.commands.cells:submit")


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="cell mAP of every scoring (image, cell, CAM, combined, tuned, ensembles, TTA) on images with true cells",
    )
    p.add_argument(
        "--model",
        type=Path,
        nargs="+",
        required=True,
        metavar="RUN",
        help="an image run folder; several (e.g. the runs of each fold) add ensemble rows",
    )
    p.add_argument(
        "--cell-model",
        type=Path,
        nargs="+",
        required=True,
        metavar="CELL_RUN",
        help="a cell run folder (train --level cell), or several",
    )
    p.add_argument("--no-tta", action="store_true", help="leave out the rows with test-time augmentation (8× work)")
    p.add_argument(
        "--out", type=Path, default=None, metavar="RULE_JSON", help="write the best row's rule here, for submit --rule"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a sample with true cells (masks/, cells.csv); its test images are scored (default: 400 "
        "held-out images from the sample generator with seed 1, hpa_nb.core.env.EVALUATION_SAMPLE, "
        "generated on first use)",
    )
    p.add_argument(
        "--segmentation",
        choices=(*SEGMENTERS, "masks"),
        default="classical",
        help="how the scored cells are found; masks: the true cells (no segmentation error)",
    )
    _hpacellseg_option(p)
    _workers_option(p)
    p.set_defaults(handler="hpa_nb.commands.cells:compare")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure the input pipeline (loader), training steps (train) or the per-image "
        "cell work with one worker and with every core (cells)",
    )
    p.add_argument("kind", choices=BENCH_KINDS)
    p.add_argument("--data", default=None, help="data folder (default: discovered)")
    p.add_argument("--image-size", type=int, default=256, help="output (training) image size in px")
    p.add_argument("--channels", choices=tuple(CHANNEL_SETS), default=DataSettings.channels)
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="loader: benchmark a temporary sample of images this large instead of --data "
        "(e.g. 1024: realistic PNG decode cost; the default sample's are 256 px)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="loader: images in the --size sample (default 48); cells: training and test images (12)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="cells: the workers to compare with one (default: every core this process may use)",
    )
    p.add_argument(
        "--bit-depth",
        type=int,
        choices=(8, 16),
        default=8,
        help="loader: bit depth of the --size sample's PNGs (the competition's train/ PNGs are 16-bit)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="loader: seconds per reader per round")
    p.add_argument("--rounds", type=int, default=3, help="loader, cells: interleaved rounds; figures are their median")
    p.add_argument("--backbone", default="tiny", help="train: the model to time (from scratch)")
    p.add_argument("--batch-size", type=int, default=16, help="train: per replica")
    p.add_argument("--steps", type=int, default=10, help="train: timed steps per feed, after warm-up")
    p.set_defaults(handler="hpa_nb.commands.bench:main")


def _kaggle_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kaggle", help="build self-contained Kaggle kernels; push them and fetch results with the kaggle CLI"
    )
    actions = p.add_subparsers(dest="kaggle_action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="write build/kaggle/<name>/ for every notebooks/*.py (or NAME ...)")
    build.add_argument("names", nargs="*", metavar="NAME", help="notebooks to bundle, e.g. 03_train (default: all)")
    build.add_argument("--check", action="store_true", help="build nothing; exit 2 if a committed bundle is stale")
    push = actions.add_parser("push", help="build NAME with your kernel id, then `kaggle kernels push -p`")
    status = actions.add_parser("status", help="`kaggle kernels status` of NAME's kernel")
    output = actions.add_parser("output", help="`kaggle kernels output` of NAME's kernel into --out")
    for action in (push, status, output):
        action.add_argument(
            "name", nargs="?", default="03_train", metavar="NAME", help="notebook name (default 03_train)"
        )
        action.add_argument(
            "--username",
            help="Kaggle username (default: KAGGLE_USERNAME, kernel-metadata.json's "
            "owner, or what `kaggle config view` shows)",
        )
    push.add_argument(
        "--accelerator",
        choices=(*MACHINES, "none"),
        default=None,
        metavar="MACHINE",
        help=f"the machine to run on: {', '.join(MACHINES)} or none (CPU); default: the kernel's "
        "own in hpa_nb.core.chain.KERNELS (TpuV5E8 for 03 and 07, CPU for the rest)",
    )
    push.add_argument(
        "--no-internet", action="store_true", help="run offline (attach the weights with --dataset/--model)"
    )
    push.add_argument(
        "--dataset", action="append", default=[], metavar="OWNER/SLUG", help="attach a dataset (repeatable)"
    )
    push.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="OWNER/MODEL/FRAMEWORK/VARIATION/VERSION",
        help="attach a Kaggle model (repeatable)",
    )
    push.add_argument(
        "--resume-from",
        metavar="OWNER/KERNEL[/VERSION]",
        help="attach that kernel's output (a stopped session's work; its latest version, or the one "
        "named) and go on from it (03_train: its run; 00_prepare: its shards)",
    )
    push.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="NAME|OWNER/KERNEL[/VERSION]",
        help="attach another kernel's output (repeatable), e.g. 05_submission --attach 07_cell_train",
    )
    push.add_argument(
        "--fold",
        type=int,
        metavar="K",
        help="03_train: train fold K (with --folds) as a kernel of its "
        "own, hpa-03-train-fold-K, so all folds can be attached",
    )
    push.add_argument("--folds", type=int, default=5, help="with --fold: how many folds (default 5)")
    push.add_argument(
        "--shards",
        metavar="OWNER/KERNEL[/VERSION]",
        help="03_train: attach the 00_prepare kernel's output and train from its compact shards",
    )
    output.add_argument("--out", type=Path, help="download folder (default out/kaggle/NAME)")
    chain = actions.add_parser(
        "chain",
        help="the kernels from fork to submission: plan them, run them (again at any "
        "moment: nothing is pushed twice), or show where they stand",
    )
    chain.add_argument("chain_action", choices=("plan", "run", "status"), metavar="plan|run|status")
    chain.add_argument("--folds", type=int, default=None, help="train 03_train as K fold kernels (hpa-03-train-fold-k)")
    chain.add_argument("--username", help="Kaggle username (default: as for push)")
    chain.add_argument("--wait", action="store_true", help="run: poll (with backoff) until the chain ends or stops")
    chain.add_argument(
        "--submit",
        action="store_true",
        help="run: once 05_submission is done, submit it (`kaggle competitions submit -k`)",
    )
    chain.add_argument(
        "--sessions",
        type=int,
        default=1,
        metavar="N",
        help="kernels of one accelerator kind (TPU, GPU) queued or running at once (default 1: Kaggle "
        "limits an account's sessions)",
    )
    chain.add_argument("--poll", type=float, default=60.0, metavar="SECONDS", help="run --wait: the first wait")
    chain.add_argument(
        "--accelerator",
        choices=tuple(MACHINES),
        default=None,
        metavar="MACHINE",
        help="the training kernels' machine instead of TpuV5E8, e.g. NvidiaTeslaT4Highmem (T4 ×2) for "
        "an account without TPU access; the projected hours stay the TPU's",
    )
    image_set_parser = actions.add_parser(
        "image-set",
        help="resolve Kaggle's TPU image recipe again into a pinned package "
        "set (requirements-kaggle-tpu-DATE.txt), for Python 3.12",
    )
    image_set_parser.add_argument("--recipe", type=Path, default=None, help="default: .ci/kaggle-tpu-recipe.txt")
    image_set_parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: requirements-kaggle-tpu-YYYY-MM.txt of this month, in the repository",
    )
    image_set_parser.add_argument(
        "--python", default=None, help="a Python 3.12 interpreter (default: this one, or pyenv's)"
    )
    offline = actions.add_parser(
        "hpacellseg-dataset",
        help="lay out HPA-Cell-Segmentation's sources and weights as "
        "a Kaggle dataset for the internet-off submission kernel",
    )
    offline.add_argument("--package", type=Path, required=True, help="a clone of CellProfiling/HPA-Cell-Segmentation")
    offline.add_argument("--fork", type=Path, required=True, help="a clone of haoxusci/pytorch_zoo")
    offline.add_argument(
        "--weights",
        type=Path,
        required=True,
        help="folder with dpn_unet_nuclei_v1.pth and dpn_unet_cell_3ch_v1.pth (zenodo.org/record/4665863)",
    )
    offline.add_argument("--out", type=Path, default=Path("build/hpacellseg-offline"), help="dataset folder to write")
    offline.add_argument("--username", help="Kaggle username, for the dataset id (default: as for push)")
    offline.add_argument(
        "--create", action="store_true", help="then upload it: `kaggle datasets create -p OUT` (private)"
    )
    p.set_defaults(handler="hpa_nb.commands.kaggle:main")


# In the order of the workflow, which is the order `--help` lists them.
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _sample_parser,
    _shard_parser,
    _tiles_parser,
    _train_parser,
    _evaluate_parser,
    _folds_parser,
    _submit_parser,
    _compare_parser,
    _bench_parser,
    _kaggle_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpa_nb",
        description="HPA Single Cell Classification toolkit: sample data, shards, training, evaluation, "
        "submission, benchmarks and Kaggle kernels. Data defaults to hpa_nb.core.env.find_data().",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in PARSERS:
        add(sub)
    _add_verbosity(parser)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``--quiet``/``--verbose`` (`hpa_nb.core.log`) on `parser` and on every subcommand below it, so they may come
    before the verb or after it. Their default is SUPPRESS (an option left out sets nothing), so one given before
    the verb is not undone by the verb's own parser; `main` reads them with a default of False."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug lines too")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _add_verbosity(child)


def handler(reference: str) -> Callable[[argparse.Namespace], None]:
    """The function a parser names as ``"hpa_nb.commands.MODULE:FUNCTION"``, its module imported now."""
    module, function = reference.split(":")
    return getattr(importlib.import_module(module), function)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)):
        return True
    if "tensorflow" not in sys.modules:  # only a verb that loaded it can raise its errors
        return False
    # a tf.data pipeline surfaces bad input as an OpError (decode failures, truncated records)
    errors = sys.modules["tensorflow"].errors
    return isinstance(exc, (errors.InvalidArgumentError, errors.DataLossError, errors.NotFoundError))


def _one_line(exc: BaseException) -> str:
    """The error as one line; a TensorFlow error loses its graph-node and op noise."""
    if "tensorflow" in sys.modules and "OpError" in {cls.__name__ for cls in type(exc).__mro__}:
        return handler("hpa_nb.data.bad_input:error_message")(exc)
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup("quiet" if getattr(args, "quiet", False) else "verbose" if getattr(args, "verbose", False) else "normal")
    try:
        handler(args.handler)(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("HPA_DEBUG") or not _is_user_error(exc):
            raise
        message = _one_line(exc)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
