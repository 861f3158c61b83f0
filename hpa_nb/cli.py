"""``python -m hpa_nb <verb>``: one thin subcommand per job, each over a library function.

Parsing is cheap (no TensorFlow import) so ``--help`` and bad arguments answer at once;
each handler imports what it needs. User errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import hpa_nb  # noqa: F401  (picks the Keras backend before anything imports Keras)

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by the user's input; the CLI prints it as one line."""


def _data_dir(value: str | None) -> Path:
    """An explicit --data folder, or the one `hpa_nb.env.find_data` discovers (announced)."""
    if value:
        path = Path(value)
        if not path.is_dir():
            raise FileNotFoundError(f"data folder {path} does not exist")
        return path
    from hpa_nb.env import find_data

    source = find_data()
    print(f"data: {source}", file=sys.stderr)
    return source.path


# --- sample -------------------------------------------------------------------------------
def _sample_parser(sub: argparse._SubParsersAction) -> None:
    from hpa_nb.env import DEFAULT_SAMPLE

    p = sub.add_parser("sample", help="write an HPA-like synthetic data set in the competition layout")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--images", type=int, default=DEFAULT_SAMPLE["images"], help="training images")
    p.add_argument("--test-images", type=int, default=DEFAULT_SAMPLE["test_images"])
    p.add_argument("--size", type=int, default=DEFAULT_SAMPLE["size"], help="largest image side in px")
    p.add_argument("--seed", type=int, default=DEFAULT_SAMPLE["seed"])
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=DEFAULT_SAMPLE["bit_depth"])
    p.set_defaults(handler=_sample)


def _sample(args: argparse.Namespace) -> None:
    from hpa_nb.sample import write_sample

    write_sample(args.out, images=args.images, size=args.size, seed=args.seed,
                 bit_depth=args.bit_depth, test_images=args.test_images)
    print(f"wrote sample to {args.out}")


PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_sample_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpa_nb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in PARSERS:
        add(sub)
    return parser


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)):
        return True
    try:  # a tf.data pipeline surfaces bad input as an OpError (decode failures, truncated records)
        import tensorflow as tf

        return isinstance(exc, (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.NotFoundError))
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("HPA_DEBUG") or not _is_user_error(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
