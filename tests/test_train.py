"""hpa_nb.training.train and `python -m hpa_nb train`: quick training, the run folder, resume, the distributed CPU paths."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import kill_when_written

from hpa_nb.cli import main
from hpa_nb.data import pipeline
from hpa_nb.data.shards import write_shards
from hpa_nb.training import train as train_module
from hpa_nb.training.config import QUICK, SECTIONS, TrainConfig
from hpa_nb.training.model import build_backbone
from hpa_nb.training.plan import check_resumable, load_checkpoint, whole_executions
from hpa_nb.training.run import (
    RunFolder,
    clear_previous,
    data_fingerprint,
    last_checkpoint,
    load_config,
    load_info,
    load_model,
    load_split,
    unfinished,
    write_info,
)
from hpa_nb.training.split import split_run
from hpa_nb.training.train import TrainResult

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--quick", "--epochs", "1", "--steps-per-epoch", "2", "--image-size", "32"]


# --- the config, no TensorFlow needed -----------------------------------------------------
def test_quick_variant_takes_explicit_values_over_quick_ones():
    config = TrainConfig.quick_variant(epochs=1, out_dir="x")
    assert config.runtime.quick and config.model.backbone == QUICK["backbone"] and config.model.weights is None
    assert config.optimisation.epochs == 1 and config.runtime.out_dir == "x"
    assert TrainConfig().model.backbone == "efficientnetb0" and not TrainConfig().runtime.quick


def test_load_config_ignores_the_runtime_keys(tmp_path):
    saved = {**TrainConfig.quick_variant(out_dir=str(tmp_path)).to_json(), "replicas": 8, "backend": "jax"}
    RunFolder(tmp_path).config.write_text(json.dumps(saved))
    assert load_config(tmp_path) == TrainConfig.quick_variant(out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing")


def test_the_config_is_frozen_sections_saved_flat_and_an_older_runs_config_json_still_loads(tmp_path):
    sections = [field.name for field in dataclasses.fields(TrainConfig)]
    assert sections == list(SECTIONS) == ["data", "model", "optimisation", "validation", "cells", "runtime"]
    names = [name for section in SECTIONS.values() for name in section]
    assert len(names) == len(set(names)) == 47  # each option in one section
    config = TrainConfig.of(max_lr=0.5, image_size=96, level="cell")
    assert (config.optimisation.max_lr, config.data.image_size, config.cells.level) == (0.5, 96, "cell")
    assert config.section("optimisation")["max_lr"] == 0.5 and list(config.to_json()) == names  # flat, in order
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optimisation.max_lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data = TrainConfig().data
    changed = config.replace(epochs=3, weights="none")  # by flat name, normalised as at construction
    assert (changed.optimisation.epochs, changed.model.weights, changed.optimisation.max_lr) == (3, None, 0.5)
    assert config.optimisation.epochs == TrainConfig().optimisation.epochs  # the original unchanged
    with pytest.raises(TypeError, match="unknown training option: max_learning_rate"):
        TrainConfig.of(max_learning_rate=1.0)
    with pytest.raises(TypeError):
        TrainConfig("data")  # by name only
    # a config.json written now is flat and reads back the same
    RunFolder(tmp_path).config.write_text(json.dumps({**config.to_json(), "replicas": 1}))
    assert load_config(tmp_path) == config
    # config.json of a run trained before the sections (the field order of then, and its runtime keys), as written
    older = {
        "data_dir": "d",
        "shards": None,
        "level": "image",
        "tiles": None,
        "relabel": False,
        "relabel_folds": 2,
        "split_from": None,
        "out_dir": str(tmp_path),
        "image_size": 64,
        "channels": "rgb",
        "backbone": "tiny",
        "weights": None,
        "dropout": 0.2,
        "epochs": 5,
        "batch_size": 16,
        "steps_per_epoch": None,
        "val_fraction": 0.2,
        "seed": 0,
        "quick": True,
        "resume": False,
        "max_lr": 0.008,
        "patience": 3,
        "cache": True,
        "backend": "tensorflow",
        "replicas": 1,
        "final": {"val_auc": 0.7},
    }
    RunFolder(tmp_path).config.write_text(json.dumps(older))
    loaded = load_config(tmp_path)
    assert (
        loaded.model.backbone == "tiny"
        and loaded.optimisation.max_lr == 0.008
        and loaded.section("data")["data_dir"] == "d"
    )
    assert loaded.validation.bn_recalibration == "epoch"  # a field the older run did not have: its default


def test_make_picks_quick_or_full_and_ignores_unset_options():
    assert TrainConfig.make(True, epochs=None, image_size=48) == TrainConfig.quick_variant(image_size=48)
    assert TrainConfig.make(False, backbone=None, epochs=3) == TrainConfig.of(epochs=3)


def test_load_split_reads_both_subsets(tmp_path):
    RunFolder(tmp_path).split.write_text("ID,subset\na,train\nb,val\nc,train\n")
    assert load_split(tmp_path) == {"train": ["a", "c"], "val": ["b"]}
    with pytest.raises(FileNotFoundError, match="split.csv"):
        load_split(tmp_path / "missing")


def test_numeric_looking_ids_survive_the_split_round_trip(tmp_path):
    ids = [f"{index:04d}" for index in range(20)] + ["1e3", "NA"]
    pd.DataFrame({"ID": ids, "Label": [str(index % 3) for index in range(len(ids))]}).to_csv(
        tmp_path / "train.csv", index=False
    )
    config = TrainConfig.of(val_fraction=0.25)
    first = split_run(tmp_path, tmp_path, config, reuse=False)
    config = TrainConfig.of(val_fraction=0.5, seed=7)  # a resumed run reads split.csv, whatever the config says now
    again = split_run(tmp_path, tmp_path, config, reuse=True)
    assert sorted(first[0] + first[1]) == sorted(ids) and again[:2] == first[:2]
    np.testing.assert_array_equal(again[2], first[2])
    np.testing.assert_array_equal(again[3], first[3])


def test_a_fresh_run_clears_the_previous_runs_files_first(tmp_path, capsys):
    for name in ("model.keras", "history.csv", "config.json", "split.csv", "notes.txt"):
        (tmp_path / name).write_text("old")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch-003.keras").write_text("old")
    removed = clear_previous(tmp_path)
    assert removed == ["model.keras", "history.csv", "config.json", "split.csv", "checkpoints"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]  # not ours: kept
    assert "--resume" in capsys.readouterr().err
    assert clear_previous(tmp_path) == []


# --- a trained run: what `train` writes, and the model it saves --------------------------------------------------
# Whether the quick model learns on the default sample is checked where it is trained for the README's figures:
# the 03_train notebook asserts its validation AUC (nbval runs it in `make test`).
@pytest.fixture(scope="module")
def validation(trained_result, small_sample):
    """The validation split of the shared trained run as in-memory arrays, and the saved model's predictions on it."""
    config = load_config(trained_result.run_dir)
    val_ids = load_split(trained_result.run_dir)["val"]
    batches = list(
        pipeline.eval_dataset(
            config.data.data_dir, val_ids, config.data.image_size, config.data.channels, 64, with_id=False
        ).as_numpy_iterator()
    )
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    model = load_model(trained_result.run_dir)
    return images, labels, model, model.predict(images, verbose=0)


def test_inference_mode_agrees_with_batch_statistics(validation):
    """The saved model's moving BN statistics must match what the batches themselves give: after 4 steps at
    momentum 0.99 they would still be the initial 0 and 1 but for the re-estimation (`bn_recalibration`)."""
    images, labels, model, inference = validation
    model.get_layer("dropout").rate = 0.0  # compare batch norm only
    batch_statistics = np.concatenate(
        [np.asarray(model(images[i : i + 16], training=True)) for i in range(0, len(images), 16)]
    )
    assert np.abs(inference - batch_statistics).mean() < 0.08


def test_run_folder_holds_model_history_config_split_and_checkpoints(trained_result, small_sample):
    run = trained_result.run_dir
    info = load_info(run)
    assert (info["backend"], info["device"], info["replicas"]) == ("tensorflow", "cpu", 1)
    assert info["global_batch_size"] == 4
    assert info["data_fingerprint"] == data_fingerprint(Path(small_sample))
    assert load_config(run).data.image_size == 32
    epochs = info["epochs_run"]
    assert epochs == 2
    history = pd.read_csv(RunFolder(run).history)
    assert history["epoch"].tolist() == list(range(epochs))
    assert {"loss", "auc", "map", "val_loss", "val_auc", "val_map"} <= set(history.columns)
    split = pd.read_csv(RunFolder(run).split)
    all_ids = set(pd.read_csv(Path(small_sample) / "train.csv")["ID"])
    assert set(split["ID"]) == all_ids and split["ID"].is_unique
    assert set(split["subset"]) == {"train", "val"}
    checkpoints = sorted(p.name for p in RunFolder(run).checkpoints.iterdir())
    assert checkpoints == [f"epoch-{e:03d}.keras" for e in (epochs - 1, epochs)]
    assert not [p for p in run.rglob(".tmp*")]


def test_saved_model_gives_the_trained_models_predictions(trained_result, validation):
    images, _, _, saved = validation
    np.testing.assert_allclose(saved, trained_result.model.predict(images, verbose=0), rtol=1e-4, atol=1e-6)


# --- the command: overrides, resume, errors -----------------------------------------------
def _iterations(checkpoint: Path) -> int:
    return int(load_checkpoint(checkpoint).optimizer.iterations.numpy())


def _environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _train_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "hpa_nb", "train", *arguments]


def _kill_after_checkpoint(command: list[str], run: Path, epoch: int, timeout: float = 300) -> None:
    """Start `command`, SIGKILL it as soon as the checkpoint of `epoch` exists (as a lost Kaggle session would)."""
    kill_when_written(command, RunFolder(run).checkpoint(epoch), _environment(), timeout)


@pytest.mark.slow
def test_a_killed_run_resumes_in_a_fresh_process_in_place(small_sample, tmp_path):
    """(A resume from a copy attached as Kaggle mounts an earlier version's output: the Kaggle chain's 03_train.)"""
    run = tmp_path / "run"
    _kill_after_checkpoint(
        _train_command(
            "--data",
            str(small_sample),
            "--out",
            str(run),
            *TINY_RUN[:1],
            "--epochs",
            "6",
            "--steps-per-epoch",
            "3",
            "--image-size",
            "32",
            "--patience",
            "10",
        ),
        run,
        epoch=2,
    )
    finished, _ = last_checkpoint(run)
    assert finished >= 2
    before = pd.read_csv(RunFolder(run).history)
    before = before[before["epoch"] < finished]  # a row written just before the kill may lack its checkpoint
    split = RunFolder(run).split.read_text()

    resumed = subprocess.run(
        _train_command("--resume", "--out", str(run), "--epochs", str(finished + 2)),
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing after epoch {finished}" in resumed.stderr
    history = pd.read_csv(RunFolder(run).history)
    assert history["epoch"].tolist() == list(range(finished + 2))
    pd.testing.assert_frame_equal(history.iloc[:finished], before.reset_index(drop=True))
    assert _iterations(RunFolder(run).checkpoint(finished + 2)) == 3 * (finished + 2)
    assert RunFolder(run).split.read_text() == split and RunFolder(run).model.is_file()


@pytest.mark.slow
def test_a_run_stops_at_its_deadline_with_its_checkpoint_and_the_next_process_finishes_it(small_sample, tmp_path):
    run = tmp_path / "run"
    common = ("--epochs", "3", "--steps-per-epoch", "2", "--image-size", "32", "--patience", "10")
    # a deadline already past: the run stops after the epoch in hand, as a Kaggle version at HOURS would
    stopped = subprocess.run(
        _train_command("--data", str(small_sample), "--out", str(run), "--quick", *common, "--hours", "1e-9"),
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopping after epoch 1 of 3: the next one would end past the deadline" in stopped.stderr
    assert "projection: training" in stopped.stderr and "stopped at --hours" in stopped.stdout
    info = load_info(run)
    assert (info["epochs_run"], info["stopped_at_deadline"]) == (1, True)
    assert sorted(path.name for path in RunFolder(run).checkpoints.iterdir()) == ["epoch-001.keras"]
    assert "stopped at its deadline after epoch 1 of 3" in unfinished(run)

    finished = subprocess.run(
        _train_command("--resume", "--out", str(run), *common),
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "continuing after epoch 1" in finished.stderr and "stopping after" not in finished.stderr
    info = load_info(run)
    assert (info["epochs_run"], info["stopped_at_deadline"]) == (3, False) and unfinished(run) == ""
    assert pd.read_csv(RunFolder(run).history)["epoch"].tolist() == [0, 1, 2]


@pytest.mark.slow
def test_a_runs_model_loads_in_a_fresh_process_with_plain_keras(trained_run):
    path = RunFolder(trained_run).model
    # each option in turn, in one process: hpa_nb is never imported there unless asked
    probe = (
        "import sys, numpy as np{extra}; import keras\n"
        "for options in ({{}}, {{'compile': False}}):\n"
        "    model = keras.saving.load_model(sys.argv[1], **options)\n"
        "    print(model.predict(np.zeros((1, 32, 32, 3), 'float32'), verbose=0).shape, 'hpa_nb' in sys.modules)"
    )
    environment = {key: value for key, value in _environment().items() if key != "PYTHONPATH"}
    for extra, imported in ((", hpa_nb", True), ("", False)):
        done = subprocess.run(
            [sys.executable, "-c", probe.format(extra=extra), str(path)],
            env={**environment, "PYTHONPATH": str(REPO)} if imported else environment,
            cwd=trained_run,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == ["(1,", "19)", str(imported)] * 2, done.stdout


def test_an_epoch_is_a_whole_number_of_compiled_calls():
    assert whole_executions(136, 32) == (128, 32)
    assert whole_executions(5, 2) == (4, 2)
    assert whole_executions(3, 32) == (3, 3)
    assert whole_executions(10, 1) == (10, 1)


def test_resuming_with_other_model_options_or_other_data_is_refused(small_sample, tmp_path):
    config = TrainConfig.quick_variant(data_dir=str(small_sample), out_dir=str(tmp_path))
    write_info(tmp_path, config, {"data_fingerprint": "abc"})
    check_resumable(tmp_path, config, "abc")
    with pytest.raises(ValueError, match="image_size=64"):
        check_resumable(tmp_path, TrainConfig.quick_variant(image_size=32), "abc")
    with pytest.raises(ValueError, match="other data"):
        check_resumable(tmp_path, config, "def")


def test_a_missing_weights_file_is_one_line_exit_2(small_sample, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(small_sample),
            "--out",
            str(tmp_path / "run"),
            "--weights",
            str(tmp_path / "absent.weights.h5"),
        ]
    )
    assert code == 2
    assert "absent.weights.h5" in capsys.readouterr().err


def test_weights_none_reaches_a_full_run_and_survives_config_json(small_sample, tmp_path, monkeypatch):
    configs = []

    def fake_train(config, hosts=None):  # the CLI passes its hosts: one here
        assert hosts is None or not hosts.several
        configs.append(config)
        return TrainResult(Path(config.runtime.out_dir), model=None, history=None)

    monkeypatch.setattr(train_module, "train", fake_train)
    assert main(["train", "--data", str(small_sample), "--out", str(tmp_path), "--weights", "none"]) == 0
    (config,) = configs
    assert not config.runtime.quick and config.model.backbone == "efficientnetb0" and config.model.weights is None
    RunFolder(tmp_path).config.write_text(json.dumps(config.to_json()))
    assert load_config(tmp_path) == config
    build_backbone(config.model.backbone, 32, config.data.channels, config.model.weights)  # no weights: no download


# --- distributed runs on CPU, each in its own process (the backend is fixed per process) --
def _train_in_subprocess(small_sample: Path, run: Path, extra_env: dict[str, str], batch_size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **extra_env}
    command = [
        sys.executable,
        "-m",
        "hpa_nb",
        "train",
        "--data",
        str(small_sample),
        "--out",
        str(run),
        *TINY_RUN,
        "--batch-size",
        str(batch_size),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    history = pd.read_csv(RunFolder(run).history)
    assert np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()
    return json.loads(RunFolder(run).config.read_text())


@pytest.mark.slow
def test_tensorflow_mirrored_strategy_over_two_logical_cpus(small_sample, tmp_path):
    info = _train_in_subprocess(
        small_sample, tmp_path / "run", {"KERAS_BACKEND": "tensorflow", "HPA_CPU_REPLICAS": "2"}, batch_size=4
    )
    assert (info["backend"], info["replicas"], info["distribution"]) == ("tensorflow", 2, "MirroredStrategy")
    assert info["global_batch_size"] == 8


# What a v5e-8 run uses and a CPU run does not (8 devices under JAX's DataParallel, mixed_bfloat16, several steps per
# compiled call with an epoch rounded down to whole calls), killed and resumed in a new process: test_hosts, where one
# process with 8 virtual devices is the two hosts' reference.


def test_a_run_reads_shards_written_elsewhere_as_uint8_batches(small_sample, tmp_path):

    shard_dir = tmp_path / "prepared"
    write_shards(small_sample, shard_dir, size=64, channels="rgb", progress=False)
    config = TrainConfig.make(
        True, data_dir=str(small_sample), out_dir=str(tmp_path / "run"), shards=str(shard_dir), epochs=1
    )
    plan = train_module.prepare(config)
    assert plan.layout.startswith(f"compact shards {shard_dir} (40 images, 64 px, rgb, raw)")
    assert f"data: {plan.layout}" in plan.summary() and plan.config.data.shards == str(shard_dir)
    images, labels = next(iter(plan.datasets.train))
    val_images = next(iter(plan.datasets.val))[0]
    # a quarter of float32's bytes leave the host; the model's float32 input casts them in the compiled step
    assert images.dtype == val_images.dtype == tf.uint8 and images.shape[1:] == (64, 64, 3)
    assert plan.model.inputs[0].dtype == "float32"


@pytest.mark.parametrize(
    ("epoch_seconds", "stops_after"),
    [
        ((10, 10, 10, 10, 10), 2),  # after epoch 2 (t=20) the next would end at 30, past 25
        ((10, 4, 4, 4, 4), 3),  # the slowest so far decides: after epoch 3 (t=18) one of 10 s would end at 28
        ((4, 4, 4, 4, 4), None),  # all five end by t=20
        ((30, 1, 1, 1, 1), 1),  # the first epoch already ends past it
    ],
)
def test_the_deadline_stops_a_run_when_the_next_epoch_would_end_past_it(
    monkeypatch, capsys, epoch_seconds, stops_after
):
    """The forecast itself, with a clock that moves only as the epochs say: a run stops after the epoch in hand when
    that epoch plus the slowest one so far would end past the deadline, and says so once."""
    from hpa_nb.training import callbacks
    from hpa_nb.training.hosts import Hosts

    now = [1000.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: now[0])
    config = TrainConfig.make(True).replace(epochs=5, deadline=1025.0)
    plan = type("Plan", (), {"config": config, "steps_per_epoch": 4, "global_batch": 8, "finished_epochs": 0})()
    plan.hosts = Hosts()
    clock = callbacks.clock(plan)
    clock.set_model(type("Model", (), {"stop_training": False})())
    ran = 0
    for epoch, seconds in enumerate(epoch_seconds):
        clock.on_epoch_begin(epoch)
        now[0] += seconds
        clock.on_epoch_end(epoch)
        ran += 1
        if clock.model.stop_training:
            break
    assert ran == (stops_after or len(epoch_seconds))
    assert clock.stopped_at_deadline == (stops_after is not None)
    lines = capsys.readouterr().err.splitlines()
    stopping = [line for line in lines if line.startswith("train: stopping after epoch")]
    assert stopping == (
        [
            f"train: stopping after epoch {stops_after} of 5: the next one would end past the deadline "
            "(HOURS); its checkpoint is saved, resume from this output"
        ]
        if stops_after
        else []
    )
    assert sum(line.startswith("projection: training") for line in lines) == 1  # from the first epoch, once
