"""`python -m hpa_nb train`: options → `TrainConfig` → `hpa_nb.training.train.train`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hpa_nb.cells import relabel
from hpa_nb.commands.common import data_dir
from hpa_nb.training import hosts, inputs, run, train
from hpa_nb.training.config import TrainConfig

TRAIN_OPTIONS = (
    "shards",
    "folds",
    "fold",
    "level",
    "tiles",
    "relabel",
    "split_from",
    "image_size",
    "channels",
    "backbone",
    "weights",
    "epochs",
    "batch_size",
    "steps_per_epoch",
    "val_fraction",
    "seed",
    "max_lr",
    "loss",
    "patience",
    "precision",
    "steps_per_execution",
    "allow_sample_data",
    "allow_cpu",
)


def main(args: argparse.Namespace) -> None:

    several = hosts.from_options(args.coordinator, args.num_processes, args.process_id)
    explicit = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    out = args.out or run.default_dir()
    explicit["out_dir"] = str(out)
    explicit["deadline"] = time.time() + args.hours * 3600 if args.hours else None  # never a saved run's old one
    # A resumed run keeps the options it was started with; the ones given now go on top.
    previous = inputs.previous_run(args.resume_from) if args.resume_from else out if args.resume else None
    data, *extra = args.data or [None]
    if extra:
        explicit["extra_data"] = [str(data_dir(folder)) for folder in extra]
    if previous is not None and run.RunFolder(previous).config.is_file():
        saved = run.load_config(previous)
        kept = (
            saved.data.data_dir if saved.data.data_dir and Path(saved.data.data_dir).is_dir() else None
        )  # else: discover again
        explicit["data_dir"] = str(data_dir(data or kept))
        config = saved.replace(resume=True, resume_from=str(previous) if args.resume_from else None, **explicit)
    else:
        explicit["data_dir"] = str(data_dir(data))
        config = TrainConfig.make(args.quick, resume=args.resume, **explicit)
    if config.cells.relabel and several.several:
        raise ValueError("--relabel trains on one host: leave out --coordinator, --num-processes and --process-id")
    if config.cells.relabel:  # a step of its own, before the cell run that reads its targets
        relabel.relabel(config)
    result = train.train(config, several)
    print(
        f"trained {config.model.backbone} into {result.run_dir}: "
        + ", ".join(f"{name} {value:.4f}" for name, value in result.final.items())
        + ("; stopped at --hours before its last epoch: --resume to finish it" if result.stopped_at_deadline else "")
    )
