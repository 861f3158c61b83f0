"""`python -m hpa_nb submit` and `compare`: cells scored for a submission, or against true cells."""

from __future__ import annotations

import argparse
import dataclasses

from hpa_nb.cells.compare import TUNING_PARTS, compare_models
from hpa_nb.cells.rules import COMBINED_RULE, ScoreRule, load_rule
from hpa_nb.cells.scoring import load_classifier
from hpa_nb.cells.submit import submit as write_submission
from hpa_nb.commands.common import data_dir, segmentation_options
from hpa_nb.core.env import working_dir
from hpa_nb.sample.sources import ensure_evaluation_sample


def submit(args: argparse.Namespace) -> None:

    base = load_rule(args.rule) if args.rule else COMBINED_RULE if args.cell_model else ScoreRule()
    given = {
        "combine": args.combine,
        "image_weight": args.image_weight,
        "partial_scale": args.partial_scale,
        "cam_weight": args.cam_weight,
        "negative": args.negative,
        "crop": args.crop,
    }
    rule = dataclasses.replace(base, **{name: value for name, value in given.items() if value is not None})
    out = args.out or working_dir() / "submission.csv"
    written = write_submission(
        args.model,
        data_dir(args.data),
        out,
        method=args.segmentation,
        rule=rule,
        confidence_floor=args.confidence_floor,
        batch_size=args.batch_size,
        cell_run_dir=args.cell_model,
        weights=args.weights,
        cell_weights=args.cell_weights,
        tta=args.tta,
        workers=args.workers,
        **segmentation_options(args),
    )
    print(f"wrote {written}")


def compare(args: argparse.Namespace) -> None:

    data = args.data if args.data is not None else ensure_evaluation_sample()
    if not (data / "cells.csv").is_file():  # before loading two models
        raise FileNotFoundError(f"{data / 'cells.csv'} does not exist: compare needs true cells (a sample)")
    image_models = [load_classifier(folder) for folder in args.model]
    cell_models = [load_classifier(folder, level="cell") for folder in args.cell_model]
    masks = args.segmentation == "masks"
    comparison = compare_models(
        image_models,
        cell_models,
        data,
        method="classical" if masks else args.segmentation,
        use_truth_masks=masks,
        tta=not args.no_tta,
        workers=args.workers,
        **segmentation_options(args),
    )
    print(
        f"{len(comparison.images)} test images of {data}, cells: {args.segmentation}; tuned rows: each "
        f"image under weights tuned on the other {TUNING_PARTS - 1} of {TUNING_PARTS} parts"
    )
    print(comparison.table().round(3).to_string(index=False))
    if args.out:
        print(f"wrote {comparison.write_rule(args.out)} (the rule of '{comparison.best().name}')")
