"""The run folder, its one owner: where it goes, what its files are called, and every read and write of them.

`RunFolder` names every path in one (nothing else spells them). A run folder holds ``model.keras``
(`load_model`), ``history.csv``,
``config.json`` (every option plus the backend, device, replicas, global batch and a data
fingerprint), ``split.csv`` (ID, subset; image IDs at both levels), ``oof.csv`` (the held-out predictions)
and ``checkpoints/`` (one per epoch, for ``resume``). A relabelled cell run also holds ``folds/`` (its out-of-fold runs) and
``targets.csv`` (the training targets they gave, `hpa_nb.cells.relabel`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import pandas as pd

from hpa_nb.core.env import working_dir
from hpa_nb.core.files import atomic_path, write_text
from hpa_nb.core.labels import N_CLASSES
from hpa_nb.training.config import TrainConfig
from hpa_nb.training.presets import register_classes

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
SPLIT_FILE = "split.csv"
CHECKPOINT_DIR = "checkpoints"
OOF_FILE = "oof.csv"  # the saved model's predictions for the held-out images (out-of-fold for a fold run)
TARGETS_FILE = "targets.csv"  # a relabelled cell run's training targets (hpa_nb.cells.relabel)
FOLDS_DIR = "folds"  # its out-of-fold runs, one run folder each
FOLDER = "run"  # under the working folder: /kaggle/working/run on Kaggle, out/run elsewhere
CELL_FOLDER = "cell_run"  # a cell run's folder under the working folder
RELABEL_FILES = (TARGETS_FILE, FOLDS_DIR)  # what the relabel step writes into a cell run's folder before it trains


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def history(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def split(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def oof(self) -> Path:
        """The held-out images' predictions (predictions.csv format), written when the run finishes."""
        return self.path / OOF_FILE

    @property
    def targets(self) -> Path:
        return self.path / TARGETS_FILE

    def checkpoint(self, epoch: int) -> Path:
        """The checkpoint written after `epoch` epochs (1-based)."""
        return self.checkpoints / f"epoch-{epoch:03d}.keras"

    def saved_checkpoints(self) -> list[Path]:
        """The checkpoints written so far, oldest first."""
        return sorted(self.checkpoints.glob("epoch-*.keras"))

    def fold(self, k: int) -> Path:
        """The run folder of out-of-fold model `k` of a relabelled cell run."""
        return self.path / FOLDS_DIR / str(k)

    def fold_split(self, k: int) -> Path:
        """The split.csv that fold `k` trains with: the other folds' images, validated on its own."""
        return self.path / FOLDS_DIR / f"split-{k}.csv"

    def evaluation(self, split: str) -> Path:
        """Where `hpa_nb.training.evaluate` writes by default: ``eval_<split>``."""
        return self.path / f"eval_{split}"


def folders(runs: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """One run folder or several (an ensemble) as a list; None as none."""
    if runs is None:
        return []
    return [Path(runs)] if isinstance(runs, (str, os.PathLike)) else [Path(r) for r in runs]


def default_dir() -> Path:
    """Where a run goes when none is named: ``<working dir>/run``."""
    return working_dir() / FOLDER


def default_cell_dir() -> Path:
    """Where a cell run goes when none is named: ``<working dir>/cell_run``."""
    return working_dir() / CELL_FOLDER


def is_run(folder: str | Path, level: str | None = None) -> bool:
    """Whether `folder` holds a trained run (its config and model), of `level` ("image" or "cell") if given."""
    folder = Path(folder)
    if not (RunFolder(folder).config.is_file() and RunFolder(folder).model.is_file()):
        return False
    try:
        saved = json.loads(RunFolder(folder).config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return level is None or saved.get("level", "image") == level


def is_resumable(folder: str | Path) -> bool:
    """Whether `folder` holds a run that can be resumed: its config and a checkpoints folder."""
    return (Path(folder) / CONFIG_FILE).is_file() and (Path(folder) / CHECKPOINT_DIR).is_dir()


def unfinished(run_dir: str | Path) -> str:
    """A line for a run that stopped at its deadline before its last epoch (empty when it finished)."""
    info = load_info(run_dir)
    if not info.get("stopped_at_deadline"):
        return ""
    return (
        f"{run_dir} stopped at its deadline after epoch {info.get('epochs_run')} of {info.get('epochs')}: "
        f"its model is usable; push its kernel again with --resume-from to finish it"
    )


def load_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was trained with: config.json is flat, in any version (its runtime keys are left out,
    and an option an older file lacks takes its default)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in run folder {run_dir}")
    saved = json.loads(path.read_text())
    return TrainConfig.from_json(saved)


def _split_path(where: str | Path) -> Path:
    where = Path(where)
    return where if where.suffix == ".csv" else where / SPLIT_FILE


def load_split(where: str | Path) -> dict[str, list[str]]:
    """A run's ``split.csv`` (`where` is the run folder or the CSV itself) as ``{"train": [IDs], "val": [IDs]}``."""
    path = _split_path(where)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    saved = pd.read_csv(path, dtype=str, keep_default_na=False)  # IDs as written: "0001" stays "0001"
    if not {"ID", "subset"} <= set(saved.columns):
        raise ValueError(f"{path} must have columns ID,subset")
    return {subset: saved.loc[saved["subset"] == subset, "ID"].tolist() for subset in ("train", "val")}


def write_split(where: str | Path, train_ids: list[str], val_ids: list[str]) -> Path:
    """Write a run's ``split.csv`` (ID, subset) into the run folder `where` (or as the CSV `where`)."""
    frame = pd.DataFrame({"ID": [*train_ids, *val_ids], "subset": ["train"] * len(train_ids) + ["val"] * len(val_ids)})
    return write_text(_split_path(where), frame.to_csv(index=False))


def load_targets(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """A cell run's relabelled training targets (``targets.csv``: key, then 19 columns), or None."""
    path = Path(run_dir) / TARGETS_FILE
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype={"key": str})
    return dict(zip(frame["key"], frame.drop(columns="key").to_numpy(np.float32)))


def write_targets(run_dir: str | Path, targets: dict[str, np.ndarray]) -> Path:
    frame = pd.DataFrame(np.stack(list(targets.values())), columns=[f"c{c}" for c in range(N_CLASSES)])
    frame.insert(0, "key", list(targets))
    return write_text(Path(run_dir) / TARGETS_FILE, frame.to_csv(index=False, float_format="%.5f"))


def load_info(run_dir: str | Path) -> dict:
    """The whole config.json of a run: options plus backend, device, replicas, data fingerprint, results."""
    return json.loads((Path(run_dir) / CONFIG_FILE).read_text())


def data_fingerprint(root: Path) -> str:
    """A short hash of train.csv and the record files' names and sizes: which data a run saw."""
    digest = hashlib.sha256((root / "train.csv").read_bytes())
    for folder in ("shards", "train_tfrecords"):
        for path in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            digest.update(f"{folder}/{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def write_info(run_dir: Path, config: TrainConfig, runtime: dict) -> None:
    """Write ``config.json``: every option of `config`, then what the run records beside them."""
    write_text(run_dir / CONFIG_FILE, json.dumps({**config.to_json(), **runtime}, indent=1) + "\n")


def last_checkpoint(run_dir: Path) -> tuple[int, Path | None]:
    """(epochs finished, their checkpoint), or (0, None) when the run has none."""
    found = RunFolder(run_dir).saved_checkpoints()
    if not found:
        return 0, None
    return int(found[-1].stem.split("-")[1]), found[-1]


def clear_previous(run_dir: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove an earlier run's files from `run_dir` before a fresh (not resumed) run writes there.

    Otherwise a new run that fails early would leave its config and split beside the old run's
    model, and the folder would describe a model it does not hold. `keep` names files to leave (the relabel
    step's `RELABEL_FILES`, which the new run reads). Returns the names removed.
    """
    removed = []
    for name in (MODEL_FILE, HISTORY_FILE, CONFIG_FILE, SPLIT_FILE, OOF_FILE, CHECKPOINT_DIR, *RELABEL_FILES):
        path = run_dir / name
        if name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.info(
            f"train: new run in {run_dir}: removed the previous run's {', '.join(removed)} "
            "(use --resume to continue it instead)"
        )
    return removed


def adopt(source: Path, run_dir: Path) -> int:
    """Copy a killed run's config, split, history and last checkpoint into `run_dir`, to resume there.

    Nothing is copied when `run_dir` already has as many finished epochs (a re-run of the same
    session). Returns the epochs the copied run had finished.
    """
    finished, checkpoint = last_checkpoint(source)
    if checkpoint is None:
        raise FileNotFoundError(f"{source} has no checkpoint to resume from")
    if last_checkpoint(run_dir)[0] >= finished:
        return finished
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, SPLIT_FILE, HISTORY_FILE):
        if (source / name).is_file():
            with atomic_path(run_dir / name) as temporary:
                shutil.copyfile(source / name, temporary)
    with atomic_path(RunFolder(run_dir).checkpoint(finished)) as temporary:
        shutil.copyfile(checkpoint, temporary)
    logger.info(f"resume: copied {source} (after epoch {finished}) into {run_dir}")
    return finished


def load_model(run_dir: str | Path) -> keras.Model:
    """The trained model of a run folder (``RUN/model.keras``, or that file itself), uncompiled, ready for ``predict``."""
    path = Path(run_dir)
    path = RunFolder(path).model if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path} (run `python -m hpa_nb train` first)")
    if (path.parent / CONFIG_FILE).is_file():  # a KerasHub backbone's classes are registered by importing keras_hub
        register_classes(load_config(path.parent).model.backbone)
    return keras.saving.load_model(path, compile=False)


def load_history(run_dir: str | Path) -> pd.DataFrame:
    """``history.csv``: one row per finished epoch (empty when there is none yet)."""
    path = RunFolder(run_dir).history
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def append_history(run_dir: str | Path, epoch: int, logs: dict) -> None:
    """Add `epoch`'s row (0-based) to ``history.csv``, atomically."""
    row = pd.DataFrame([{"epoch": epoch, **{key: float(value) for key, value in sorted(logs.items())}}])
    write_text(
        RunFolder(run_dir).history, pd.concat([load_history(run_dir), row], ignore_index=True).to_csv(index=False)
    )


def truncate_history(run_dir: str | Path, finished: int) -> None:
    """Keep the rows of the `finished` epochs: a resumed run drops the row of an epoch that got no checkpoint."""
    if RunFolder(run_dir).history.is_file():
        rows = load_history(run_dir)
        write_text(RunFolder(run_dir).history, rows[rows["epoch"] < finished].to_csv(index=False))


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in RunFolder(run_dir).saved_checkpoints()[:-keep]:
        old.unlink()
