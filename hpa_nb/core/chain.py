"""The Kaggle chain: the notebooks as kernels in the order they run, how each runs (accelerator, internet,
the kernels whose output it reads) and their slugs. Kernel bundles and pushes live in `hpa_nb.kaggle.push`."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSettings:
    """How one notebook runs on Kaggle."""

    title: str  # must slugify to the kernel slug: Kaggle derives the URL from the title
    accelerator: str | None = None  # a Kaggle machine shape, None for CPU
    internet: bool = True
    kernel_sources: tuple[str, ...] = ()  # notebooks whose output this one reads


# The chain on Kaggle, in the order it runs (`make run` runs the notebooks in this order too): 00_prepare →
# 03_train → 04_evaluate; 06_cells → 07_cell_train (with 03_train's split) → 05_submission, last, with every model.
# Each later kernel reads the earlier ones' output where Kaggle mounts it (hpa_nb.training.inputs); `kaggle push NAME`
# attaches the kernels listed in kernel_sources.
KERNELS: dict[str, KernelSettings] = {
    # CPU, offline: reads the competition's images once and writes compact shards into its output.
    "00_prepare": KernelSettings("HPA 00 Prepare", internet=False),
    "01_eda": KernelSettings("HPA 01 EDA"),
    "02_augmentation": KernelSettings("HPA 02 Augmentation"),
    # Internet on so Keras can download ImageNet weights; see the README to run offline.
    "03_train": KernelSettings("HPA 03 Train", accelerator="TpuV5E8"),
    "04_evaluate": KernelSettings("HPA 04 Evaluate", kernel_sources=("03_train",)),
    # CPU, offline: cutting tiles segments each image with scikit-image, which the TPU image lacks.
    "06_cells": KernelSettings("HPA 06 Cells", internet=False),
    # TPU, like 03_train: the cell model on 06_cells' tiles, split by image as 03_train's run was.
    "07_cell_train": KernelSettings("HPA 07 Cell Train", accelerator="TpuV5E8", kernel_sources=("06_cells", "03_train")),
    # Code competitions only accept submissions from notebooks with the internet off. It scores cells with the
    # image run, and with the cell run too when 07_cell_train's output is attached (`push 05_submission --attach
    # 07_cell_train`); it segments with HPA-Cell-Segmentation when its offline folder is attached (`--dataset`).
    "05_submission": KernelSettings("HPA 05 Submission", internet=False, kernel_sources=("03_train",)),
}


def kernel_slug(name: str) -> str:
    """The URL slug of a notebook's kernel: "03_train" -> "hpa-03-train"."""
    return "hpa-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def kernel_settings(name: str) -> KernelSettings:
    """The table entry for a notebook; a notebook not in the table runs on CPU with a derived title."""
    if name in KERNELS:
        return KERNELS[name]
    return KernelSettings("HPA " + " ".join(re.split(r"[^A-Za-z0-9]+", name)).strip().title())
