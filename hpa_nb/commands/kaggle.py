"""`python -m hpa_nb kaggle ACTION`: bundles, pushes, the chain and Kaggle datasets, over the official kaggle
CLI. Light: nothing here loads TensorFlow, Keras or JAX."""

from __future__ import annotations

import argparse
import time

from hpa_nb.kaggle import chain, image_set, kernels
from hpa_nb.kaggle import push as kaggle
from hpa_nb.segmentation import offline as hpacellseg_offline


def main(args: argparse.Namespace) -> None:
    if args.kaggle_action == "build" and args.check:
        problems = kernels.stale_bundles()
        if problems:
            raise ValueError(f"{len(problems)} stale Kaggle bundle(s), run `make kaggle`: " + "; ".join(problems))
        print("Kaggle bundles are up to date")
    elif args.kaggle_action == "build":
        for folder in kernels.build_all(args.names or None):
            print(f"wrote {folder}")
        print(f"wrote {kernels.write_root_metadata()}")
    elif args.kaggle_action == "push":
        folder = kaggle.push(
            args.name,
            args.username,
            resume_from=args.resume_from,
            shards=args.shards,
            attach=args.attach,
            fold=None if args.fold is None else (args.fold, args.folds),
            enable_internet=False if args.no_internet else None,
            dataset_sources=args.dataset,
            model_sources=args.model,
            **({"accelerator": args.accelerator} if args.accelerator else {}),
        )
        print(f"pushed {folder}")
    elif args.kaggle_action == "image-set":
        out = args.out or image_set.REPO_ROOT / f"requirements-kaggle-tpu-{time.strftime('%Y-%m')}.txt"
        print(
            f"wrote {image_set.write(args.recipe or image_set.RECIPE, out, args.python or image_set.default_python())}"
        )
    elif args.kaggle_action == "hpacellseg-dataset":
        folder = hpacellseg_offline.build(
            args.package, args.fork, args.weights, args.out, kaggle.find_username(args.username)
        )
        print(f"wrote {folder}")
        if args.create:
            kaggle.run_kaggle(["datasets", "create", "-p", str(folder)])
        else:
            print(f"upload it with: kaggle datasets create -p {folder}")
    elif args.kaggle_action == "chain":
        run_chain(args)
    elif args.kaggle_action == "status":
        kaggle.status(args.name, args.username)
    else:
        print(f"downloaded to {kaggle.output(args.name, args.out, args.username)}")


def run_chain(args: argparse.Namespace) -> None:
    """`kaggle chain plan|run|status`."""
    steps = chain.steps(args.folds, args.accelerator)
    if args.sessions < 1:
        raise ValueError(f"--sessions {args.sessions}: at least 1")
    if args.chain_action == "plan":
        try:  # the last versions' own projections, where Kaggle can be asked
            source = chain.Kaggle(kaggle.find_username(args.username))
            states, note = chain.read_states(steps, source), f"hours: Kaggle asked as {source.username}"
        except ValueError as exc:
            states, note = None, f"hours: the docs' figures (Kaggle not asked: {exc})"
        print(chain.plan_text(steps, states, args.sessions, note))
        return
    source = chain.Kaggle(kaggle.find_username(args.username))
    if args.chain_action == "status":
        print(chain.status_text(steps, chain.read_states(steps, source)))
        return
    states = chain.drive(steps, source, wait=args.wait, sessions=args.sessions, poll=args.poll)
    if all(state.done for state in states.values()):
        print(
            chain.submit(source)
            if args.submit
            else "the chain is done: submit with --submit, or from "
            f"https://www.kaggle.com/code/{source.ref(chain.Step('05_submission'))}"
        )
