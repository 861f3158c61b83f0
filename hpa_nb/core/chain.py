"""The Kaggle chain: the notebooks as kernels, how each runs (accelerator, internet), the kernels whose output it
reads (a graph, not a list), where its own output says it is done, what it is projected to take, and its slug.
Kernel bundles and pushes live in `hpa_nb.kaggle.push`; the driver that runs the graph in `hpa_nb.kaggle.chain`."""

from __future__ import annotations

import re
from dataclasses import dataclass

# The machines `kaggle kernels push --accelerator` names (kaggle-cli 2.2), by kind; a kernel without one runs on CPU.
MACHINES = {
    "TpuV5E8": "tpu",
    "TpuV6E8": "tpu",
    "NvidiaTeslaT4": "gpu",
    "NvidiaTeslaT4Highmem": "gpu",
    "NvidiaL4": "gpu",
}

# How a kernel's push attaches one of its inputs: every push of the row ("table"), or the chain (and a user who
# asks) through `kaggle push`'s option of that name ("shards": 03_train's SHARDS, "attach": --attach).
VIA = ("table", "shards", "attach")


@dataclass(frozen=True)
class Input:
    """One edge of the chain: the kernel `kernel`'s output is read, attached as `via` says."""

    kernel: str
    via: str = "table"

    def __post_init__(self) -> None:
        if self.via not in VIA:
            raise ValueError(f"an input is attached as one of {', '.join(VIA)}, not {self.via!r}")


@dataclass(frozen=True)
class KernelSettings:
    """How one notebook runs on Kaggle."""

    title: str  # must slugify to the kernel slug: Kaggle derives the URL from the title
    accelerator: str | None = None  # a Kaggle machine shape, None for CPU
    internet: bool = True
    inputs: tuple[Input, ...] = ()  # the kernels whose output this one reads
    # Where its output says whether its work is finished, as a path under its working folder: a listing's
    # "complete" or a run's "stopped_at_deadline" (their owners: hpa_nb.data.shards/tiles, hpa_nb.training.run).
    done_marker: str | None = None
    hours: float = 0.25  # projected hours at full scale, until a version prints its own projection
    basis: str = "est."  # where `hours` comes from

    @property
    def kernel_sources(self) -> tuple[str, ...]:
        """The notebooks every push of this kernel attaches (`hpa_nb.kaggle.kernels.kernel_metadata`)."""
        return tuple(edge.kernel for edge in self.inputs if edge.via == "table")


# The chain on Kaggle, in the order `make run` runs the notebooks: 00_prepare → 03_train → 04_evaluate; 06_cells →
# 07_cell_train (with 03_train's split) → 05_submission, last, with every model. Each later kernel reads the
# earlier ones' output where Kaggle mounts it (hpa_nb.training.inputs). The hours are the docs' measured
# projections (00, 06: their writers run over generated 2048 px images, scaled to 21,806 images) and estimates.
KERNELS: dict[str, KernelSettings] = {
    # CPU, offline: reads the competition's images once and writes compact shards into its output.
    "00_prepare": KernelSettings(
        "HPA 00 Prepare", internet=False, done_marker="shards/manifest.json", hours=1.8, basis="measured"
    ),
    "01_eda": KernelSettings("HPA 01 EDA"),
    "02_augmentation": KernelSettings("HPA 02 Augmentation"),
    # Internet on so Keras can download ImageNet weights; see the docs to run offline.
    "03_train": KernelSettings(
        "HPA 03 Train",
        accelerator="TpuV5E8",
        inputs=(Input("00_prepare", "shards"),),
        done_marker="run/config.json",
        hours=2.5,
    ),
    "04_evaluate": KernelSettings("HPA 04 Evaluate", inputs=(Input("03_train"),)),
    # CPU, offline: cutting tiles segments each image with scikit-image, which the TPU image lacks.
    # 6.0 h measured on one core, over a Kaggle CPU session's 4 workers at the 2-worker efficiency of bench cells
    # (tiles 1.88x on 2 cores, 2026-12-07: 0.94): 6.0 / (4 x 0.94) = 1.6 h
    "06_cells": KernelSettings("HPA 06 Cells", internet=False, done_marker="tiles/tiles.json", hours=1.6),
    # TPU, like 03_train: the cell model on 06_cells' tiles, split by image as 03_train's run was.
    "07_cell_train": KernelSettings(
        "HPA 07 Cell Train",
        accelerator="TpuV5E8",
        inputs=(Input("06_cells"), Input("03_train")),
        done_marker="cell_run/config.json",
        hours=6.5,
    ),
    # Code competitions only accept submissions from notebooks with the internet off. It scores cells with the
    # image run, and with the cell run too when 07_cell_train's output is attached (`push 05_submission --attach
    # 07_cell_train`); it segments with HPA-Cell-Segmentation when its offline folder is attached (`--dataset`).
    "05_submission": KernelSettings(
        "HPA 05 Submission",
        internet=False,
        inputs=(Input("03_train"), Input("07_cell_train", "attach")),
        done_marker="submission.csv",
        hours=0.1,
    ),
}
# The kernels from a fork to a submission: what `kaggle chain` runs (01, 02 and 04 only look).
CHAIN = ("00_prepare", "06_cells", "03_train", "07_cell_train", "05_submission")
FOLDED = "03_train"  # the kernel that `--folds K` runs as K kernels, one per fold


# How a kernel is named: OWNER/KERNEL, or OWNER/KERNEL/VERSION for one version of it (kaggle-cli 2.2.1 and later take
# a version wherever a kernel is named, kernel sources included).
KERNEL_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[a-z0-9][a-z0-9-]*(/[1-9][0-9]*)?")


def reference_slug(reference: str) -> str:
    """The kernel's slug in ``OWNER/KERNEL[/VERSION]`` or ``KERNEL``: the name of the folder Kaggle mounts it at."""
    parts = str(reference).rstrip("/").split("/")
    return parts[-2] if len(parts) == 3 and parts[-1].isdigit() else parts[-1]


def kernel_slug(name: str) -> str:
    """The URL slug of a notebook's kernel: "03_train" -> "hpa-03-train"."""
    return "hpa-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def kernel_settings(name: str) -> KernelSettings:
    """The table entry for a notebook; a notebook not in the table runs on CPU with a derived title."""
    if name in KERNELS:
        return KERNELS[name]
    return KernelSettings("HPA " + " ".join(re.split(r"[^A-Za-z0-9]+", name)).strip().title())
