"""`python -m hpa_nb evaluate` and `folds`: a run's figures on held-out images."""

from __future__ import annotations

import argparse

from hpa_nb.commands.common import data_dir
from hpa_nb.training import folds as fold_runs
from hpa_nb.training.evaluate import evaluate as evaluate_runs
from hpa_nb.training.evaluate import format_table


def evaluate(args: argparse.Namespace) -> None:
    result = evaluate_runs(
        args.model,
        data_dir(args.data) if args.data else None,
        args.out,
        split=args.split,
        tta=args.tta,
        batch_size=args.batch_size,
        thresholds=args.thresholds,
        weights=args.weights,
    )
    print(format_table(result.metrics))
    print(f"wrote {', '.join(str(path) for path in result.files)}")


def folds(args: argparse.Namespace) -> None:
    gathered = fold_runs.gather(args.runs, args.data)
    print(gathered.table().round(4).to_string(index=False))
    if args.out:
        print(f"wrote {gathered.write(args.out)}")
