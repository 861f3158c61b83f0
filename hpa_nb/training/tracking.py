"""Optional experiment tracking with Weights & Biases: the config, every epoch's metrics and learning rate, and the
final figures of a run, logged to a W&B run named after the run folder.

Never a dependency: Kaggle's TPU image lacks wandb, and a kernel installs it only when asked (`install`, `TRACK` in
03). Tracking is on when wandb is importable and a key is found (``WANDB_API_KEY``, or a Kaggle secret of that
name), or when ``WANDB_MODE=offline`` (no key needed: the run is kept under ``RUN/wandb/`` for ``wandb sync``).
Otherwise `start` says in one line that tracking is off, and training is unchanged. The key is never printed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import keras

from hpa_nb.core.env import on_kaggle

logger = logging.getLogger(__name__)

PROJECT = "hpa-nb"
KEY = "WANDB_API_KEY"


def _kaggle_secret(name: str) -> str | None:
    """The Kaggle secret `name` (Add-ons → Secrets), or None when there is none or this is not Kaggle."""
    if not on_kaggle() or importlib.util.find_spec("kaggle_secrets") is None:
        return None
    from kaggle_secrets import UserSecretsClient  # kaggle_secrets: only inside a Kaggle kernel

    try:
        return UserSecretsClient().get_secret(name)
    except Exception:  # noqa: BLE001 -- no such secret, or secrets not attached: tracking stays off
        return None


def why_off(environ: Mapping[str, str] = os.environ) -> str | None:
    """None when tracking can start; else why not, in words."""
    if importlib.util.find_spec("wandb") is None:
        return "wandb is not installed (pip install wandb, or TRACK = True in 03_train)"
    if environ.get("WANDB_MODE") in ("offline", "dryrun") or environ.get(KEY):
        return None
    if _kaggle_secret(KEY):
        return None
    return f"no W&B key: set {KEY}, or add a Kaggle secret named {KEY}"


def install() -> None:
    """pip install wandb into this kernel (it needs the internet), when it is not there."""
    if importlib.util.find_spec("wandb") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "wandb"], check=True)
        importlib.invalidate_caches()


def run_id(run_dir: Path) -> str:
    """The W&B id of a run folder: the same for every version that resumes it."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class Tracker(keras.callbacks.Callback):
    """Logs each epoch's metrics and learning rate to the W&B run, and the final figures at `finish`."""

    def __init__(self, wandb_run: Any) -> None:
        super().__init__()
        self.wandb_run = wandb_run

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = {name: float(value) for name, value in (logs or {}).items()}
        try:
            row["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            pass
        self.wandb_run.log({"epoch": epoch, **row}, step=epoch)

    def finish(self, final: Mapping[str, float], **more: Any) -> None:
        self.wandb_run.summary.update({**{f"final_{name}": value for name, value in final.items()}, **more})
        self.wandb_run.finish()


def start(run_dir: Path, config: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Tracker | None:
    """A `Tracker` for the run in `run_dir` with its `config` logged, or None, said in one line, when tracking is off."""
    reason = why_off(environ)
    if reason is not None:
        logger.info(f"tracking: off ({reason})")
        return None
    import wandb  # wandb: optional, not on Kaggle's TPU image

    key = environ.get(KEY) or (None if environ.get("WANDB_MODE") == "offline" else _kaggle_secret(KEY))
    if key:
        wandb.login(key=key, verify=False)
    run_dir = Path(run_dir)
    wandb_run = wandb.init(
        project=PROJECT,
        name=run_dir.resolve().name,
        id=run_id(run_dir),
        resume="allow",
        dir=str(run_dir),
        config=dict(config),
    )
    mode = "offline, under " + str(run_dir / "wandb") if environ.get("WANDB_MODE") == "offline" else "online"
    logger.info(f"tracking: W&B run {wandb_run.name} ({mode})")
    return Tracker(wandb_run)
