"""hpa_nb.train and `python -m hpa_nb train`: quick training, the run folder, resume, the distributed CPU paths."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import kill_when_written
from hpa_nb.config import QUICK, TrainConfig
from hpa_nb.run import load_config, load_info, unfinished

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--quick", "--epochs", "1", "--steps-per-epoch", "2", "--image-size", "32"]


# --- the config, no TensorFlow needed -----------------------------------------------------
def test_quick_variant_takes_explicit_values_over_quick_ones():
    config = TrainConfig.quick_variant(epochs=1, out_dir="x")
    assert config.quick and config.backbone == QUICK["backbone"] and config.weights is None
    assert config.epochs == 1 and config.out_dir == "x"
    assert TrainConfig().backbone == "efficientnetb0" and not TrainConfig().quick


def test_load_config_ignores_the_runtime_keys(tmp_path):
    saved = {**TrainConfig.quick_variant(out_dir=str(tmp_path)).to_json(), "replicas": 8, "backend": "jax"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_config(tmp_path) == TrainConfig.quick_variant(out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing")


def test_make_picks_quick_or_full_and_ignores_unset_options():
    assert TrainConfig.make(True, epochs=None, image_size=48) == TrainConfig.quick_variant(image_size=48)
    assert TrainConfig.make(False, backbone=None, epochs=3) == TrainConfig(epochs=3)


def test_load_split_reads_both_subsets(tmp_path):
    from hpa_nb.run import load_split

    (tmp_path / "split.csv").write_text("ID,subset\na,train\nb,val\nc,train\n")
    assert load_split(tmp_path) == {"train": ["a", "c"], "val": ["b"]}
    with pytest.raises(FileNotFoundError, match="split.csv"):
        load_split(tmp_path / "missing")


def test_numeric_looking_ids_survive_the_split_round_trip(tmp_path):
    from hpa_nb.train import _split

    ids = [f"{index:04d}" for index in range(20)] + ["1e3", "NA"]
    pd.DataFrame({"ID": ids, "Label": [str(index % 3) for index in range(len(ids))]}).to_csv(
        tmp_path / "train.csv", index=False)
    config = TrainConfig(val_fraction=0.25)
    first = _split(tmp_path, tmp_path, config, reuse=False)
    config = TrainConfig(val_fraction=0.5, seed=7)  # a resumed run reads split.csv, whatever the config says now
    again = _split(tmp_path, tmp_path, config, reuse=True)
    assert sorted(first[0] + first[1]) == sorted(ids) and again[:2] == first[:2]
    np.testing.assert_array_equal(again[2], first[2])
    np.testing.assert_array_equal(again[3], first[3])


def test_a_fresh_run_clears_the_previous_runs_files_first(tmp_path, capsys):
    from hpa_nb.run import clear_previous

    for name in ("model.keras", "history.csv", "config.json", "split.csv", "notes.txt"):
        (tmp_path / name).write_text("old")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch-003.keras").write_text("old")
    removed = clear_previous(tmp_path)
    assert removed == ["model.keras", "history.csv", "config.json", "split.csv", "checkpoints"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]  # not ours: kept
    assert "--resume" in capsys.readouterr().err
    assert clear_previous(tmp_path) == []


# --- quick training on the default sample -------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(default_sample, tmp_path_factory):
    from hpa_nb.train import train

    config = TrainConfig.quick_variant(data_dir=str(default_sample), out_dir=str(tmp_path_factory.mktemp("quick")),
                                       verbose=2)
    return train(config)


@pytest.fixture(scope="module")
def validation(quick_run):
    """The validation split of the quick run as in-memory arrays, and the saved model's predictions on it."""
    from hpa_nb import data
    from hpa_nb.model import load_model

    config = load_config(quick_run.run_dir)
    split = pd.read_csv(quick_run.run_dir / "split.csv")
    val_ids = split.loc[split["subset"] == "val", "ID"].tolist()
    batches = list(data.eval_dataset(config.data_dir, val_ids, config.image_size, config.channels, 64,
                                     with_id=False).as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    model = load_model(quick_run.run_dir)
    return images, labels, model, model.predict(images, verbose=0)


@pytest.mark.slow
def test_quick_training_beats_chance_on_the_validation_split(validation):
    from hpa_nb.metrics import image_metrics

    _, labels, _, predictions = validation
    assert image_metrics(labels, predictions)["macro_roc_auc"] > 0.65


@pytest.mark.slow
def test_inference_mode_agrees_with_batch_statistics(validation):
    """The saved model's moving BN statistics must match what the batches themselves give."""
    from hpa_nb.metrics import image_metrics

    images, labels, model, inference = validation
    model.get_layer("dropout").rate = 0.0  # compare batch norm only
    batch_statistics = np.concatenate([np.asarray(model(images[i:i + 16], training=True))
                                       for i in range(0, len(images), 16)])
    assert np.abs(inference - batch_statistics).mean() < 0.08
    inference_auc = image_metrics(labels, inference)["macro_roc_auc"]
    assert inference_auc > image_metrics(labels, batch_statistics)["macro_roc_auc"] - 0.05


@pytest.mark.slow
def test_run_folder_holds_model_history_config_split_and_checkpoints(quick_run, default_sample):
    from hpa_nb.run import data_fingerprint, load_info

    run = quick_run.run_dir
    info = load_info(run)
    assert (info["backend"], info["device"], info["replicas"]) == ("tensorflow", "cpu", 1)
    assert info["global_batch_size"] == QUICK["batch_size"]
    assert info["data_fingerprint"] == data_fingerprint(Path(default_sample))
    assert load_config(run).image_size == QUICK["image_size"]
    epochs = info["epochs_run"]  # early stopping may end the run before QUICK["epochs"]
    assert 2 <= epochs <= QUICK["epochs"]
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(epochs))
    assert {"loss", "auc", "map", "val_loss", "val_auc", "val_map"} <= set(history.columns)
    split = pd.read_csv(run / "split.csv")
    all_ids = set(pd.read_csv(Path(default_sample) / "train.csv")["ID"])
    assert set(split["ID"]) == all_ids and split["ID"].is_unique
    assert set(split["subset"]) == {"train", "val"}
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"epoch-{e:03d}.keras" for e in (epochs - 1, epochs)]
    assert not [p for p in run.rglob(".tmp*")]


@pytest.mark.slow
def test_saved_model_gives_the_trained_models_predictions(quick_run, validation):
    images, _, _, saved = validation
    np.testing.assert_allclose(saved, quick_run.model.predict(images, verbose=0), rtol=1e-4, atol=1e-6)


# --- the command: overrides, resume, errors -----------------------------------------------
def _iterations(checkpoint: Path) -> int:
    from hpa_nb.train import load_checkpoint

    return int(load_checkpoint(checkpoint).optimizer.iterations.numpy())


def _environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _train_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "hpa_nb", "train", *arguments]


def _kill_after_checkpoint(command: list[str], run: Path, epoch: int, timeout: float = 300) -> None:
    """Start `command`, SIGKILL it as soon as the checkpoint of `epoch` exists (as a lost Kaggle session would)."""
    kill_when_written(command, run / "checkpoints" / f"epoch-{epoch:03d}.keras", _environment(), timeout)


@pytest.mark.slow
def test_a_killed_run_resumes_in_a_fresh_process_in_place_and_from_an_attached_copy(small_sample, tmp_path):
    from hpa_nb.run import last_checkpoint

    run = tmp_path / "run"
    _kill_after_checkpoint(_train_command("--data", str(small_sample), "--out", str(run), *TINY_RUN[:1],
                                          "--epochs", "6", "--steps-per-epoch", "3", "--image-size", "32",
                                          "--patience", "10"), run, epoch=2)
    finished, _ = last_checkpoint(run)
    assert finished >= 2
    before = pd.read_csv(run / "history.csv")
    before = before[before["epoch"] < finished]  # a row written just before the kill may lack its checkpoint
    attached = tmp_path / "input" / "hpa-03-train" / "run"  # how Kaggle mounts an earlier version's output
    shutil.copytree(run, attached)
    split = (run / "split.csv").read_text()

    resumed = subprocess.run(_train_command("--resume", "--out", str(run), "--epochs", str(finished + 2)),
                             env=_environment(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing after epoch {finished}" in resumed.stderr
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(finished + 2))
    pd.testing.assert_frame_equal(history.iloc[:finished], before.reset_index(drop=True))
    assert _iterations(run / "checkpoints" / f"epoch-{finished + 2:03d}.keras") == 3 * (finished + 2)
    assert (run / "split.csv").read_text() == split and (run / "model.keras").is_file()

    elsewhere = tmp_path / "new-session"
    adopted = subprocess.run(_train_command("--resume-from", str(attached.parent), "--out", str(elsewhere),
                                            "--epochs", str(finished + 1)),
                             env=_environment(), capture_output=True, text=True, timeout=600)
    assert adopted.returncode == 0, adopted.stderr[-3000:]
    assert f"continuing after epoch {finished}" in adopted.stderr
    assert pd.read_csv(elsewhere / "history.csv")["epoch"].tolist() == list(range(finished + 1))
    assert load_config(elsewhere).image_size == 32 and (elsewhere / "split.csv").read_text() == split


@pytest.mark.slow
def test_a_run_stops_at_its_deadline_with_its_checkpoint_and_the_next_process_finishes_it(small_sample, tmp_path):
    run = tmp_path / "run"
    common = ("--epochs", "3", "--steps-per-epoch", "2", "--image-size", "32", "--patience", "10")
    # a deadline already past: the run stops after the epoch in hand, as a Kaggle version at HOURS would
    stopped = subprocess.run(_train_command("--data", str(small_sample), "--out", str(run), "--quick", *common,
                                            "--hours", "1e-9"),
                             env=_environment(), capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopping after epoch 1 of 3: the next one would end past the deadline" in stopped.stderr
    assert "projection: training" in stopped.stderr and "stopped at --hours" in stopped.stdout
    info = load_info(run)
    assert (info["epochs_run"], info["stopped_at_deadline"]) == (1, True)
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["epoch-001.keras"]
    assert "stopped at its deadline after epoch 1 of 3" in unfinished(run)

    finished = subprocess.run(_train_command("--resume", "--out", str(run), *common),
                              env=_environment(), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "continuing after epoch 1" in finished.stderr and "stopping after" not in finished.stderr
    info = load_info(run)
    assert (info["epochs_run"], info["stopped_at_deadline"]) == (3, False) and unfinished(run) == ""
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0, 1, 2]


@pytest.mark.slow
def test_a_runs_model_loads_in_a_fresh_process_with_plain_keras(trained_run):
    path = trained_run / "model.keras"
    probe = ("import sys, numpy as np{extra}; import keras; model = keras.saving.load_model(sys.argv[1]{options}); "
             "print(model.predict(np.zeros((1, 32, 32, 3), 'float32'), verbose=0).shape, "
             "'hpa_nb' in sys.modules)")
    environment = {key: value for key, value in _environment().items() if key != "PYTHONPATH"}
    for extra, options, imported in ((", hpa_nb", "", True), ("", "", False), ("", ", compile=False", False)):
        done = subprocess.run([sys.executable, "-c", probe.format(extra=extra, options=options), str(path)],
                              env={**environment, "PYTHONPATH": str(REPO)} if imported else environment,
                              cwd=trained_run, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == ["(1,", "19)", str(imported)], done.stdout


def test_an_epoch_is_a_whole_number_of_compiled_calls():
    from hpa_nb.train import whole_executions

    assert whole_executions(136, 32) == (128, 32)
    assert whole_executions(5, 2) == (4, 2)
    assert whole_executions(3, 32) == (3, 3)
    assert whole_executions(10, 1) == (10, 1)


def test_resuming_with_other_model_options_or_other_data_is_refused(small_sample, tmp_path):
    from hpa_nb.run import write_info
    from hpa_nb.train import _check_resumable

    config = TrainConfig.quick_variant(data_dir=str(small_sample), out_dir=str(tmp_path))
    write_info(tmp_path, config, {"data_fingerprint": "abc"})
    _check_resumable(tmp_path, config, "abc")
    with pytest.raises(ValueError, match="image_size=64"):
        _check_resumable(tmp_path, TrainConfig.quick_variant(image_size=32), "abc")
    with pytest.raises(ValueError, match="other data"):
        _check_resumable(tmp_path, config, "def")


def test_a_missing_weights_file_is_one_line_exit_2(small_sample, tmp_path, capsys):
    from hpa_nb.cli import main

    code = main(["train", "--data", str(small_sample), "--out", str(tmp_path / "run"),
                 "--weights", str(tmp_path / "absent.weights.h5")])
    assert code == 2
    assert "absent.weights.h5" in capsys.readouterr().err


def test_weights_none_reaches_a_full_run_and_survives_config_json(small_sample, tmp_path, monkeypatch):
    from hpa_nb import train as train_module
    from hpa_nb.cli import main
    from hpa_nb.model import build_backbone
    from hpa_nb.train import TrainResult

    configs = []

    def fake_train(config):
        configs.append(config)
        return TrainResult(Path(config.out_dir), model=None, history=None)

    monkeypatch.setattr(train_module, "train", fake_train)
    assert main(["train", "--data", str(small_sample), "--out", str(tmp_path), "--weights", "none"]) == 0
    (config,) = configs
    assert not config.quick and config.backbone == "efficientnetb0" and config.weights is None
    (tmp_path / "config.json").write_text(json.dumps(config.to_json()))
    assert load_config(tmp_path) == config
    build_backbone(config.backbone, 32, config.channels, config.weights)  # no weights: no download


# --- distributed runs on CPU, each in its own process (the backend is fixed per process) --
def _train_in_subprocess(small_sample: Path, run: Path, extra_env: dict[str, str], batch_size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **extra_env}
    command = [sys.executable, "-m", "hpa_nb", "train", "--data", str(small_sample), "--out", str(run),
               *TINY_RUN, "--batch-size", str(batch_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    history = pd.read_csv(run / "history.csv")
    assert np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()
    return json.loads((run / "config.json").read_text())


@pytest.mark.slow
def test_tensorflow_mirrored_strategy_over_two_logical_cpus(small_sample, tmp_path):
    info = _train_in_subprocess(small_sample, tmp_path / "run", {
        "KERAS_BACKEND": "tensorflow", "HPA_CPU_REPLICAS": "2"}, batch_size=4)
    assert (info["backend"], info["replicas"], info["distribution"]) == ("tensorflow", 2, "MirroredStrategy")
    assert info["global_batch_size"] == 8


# What a v5e-8 run uses and a CPU run does not: 8 devices under JAX's DataParallel, mixed_bfloat16 and several
# steps per compiled call with a leftover chunk (5 steps asked in calls of 2: Keras on JAX would train 6, so an
# epoch becomes 4). TPU_LIKE runs on 8 virtual CPU devices; the global batch is 2 per device x 8.
TPU_LIKE = ("--batch-size", "2", "--steps-per-epoch", "5", "--steps-per-execution", "2", "--precision",
            "mixed_bfloat16", "--image-size", "32", "--weights", "none")


def _tpu_like_run(*arguments: str) -> tuple[subprocess.CompletedProcess, dict]:
    pytest.importorskip("jax")
    environ = _environment(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(_train_command(*arguments), env=environ, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(arguments[arguments.index("--out") + 1])
    history = pd.read_csv(out / "history.csv")
    assert np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()
    return done, json.loads((out / "config.json").read_text())


@pytest.mark.slow
def test_tpu_settings_on_eight_jax_devices_then_a_resume_in_a_new_process_at_the_right_step(small_sample, tmp_path):
    run = tmp_path / "run"
    first, info = _tpu_like_run("--quick", "--data", str(small_sample), "--out", str(run), *TPU_LIKE, "--epochs", "2")
    assert (info["backend"], info["replicas"], info["distribution"]) == ("jax", 8, "DataParallel")
    assert (info["precision"], info["steps_per_execution_used"], info["global_batch_size"]) == ("mixed_bfloat16", 2, 16)
    assert info["steps_per_epoch_used"] == 4 and "4 steps per epoch, not 5" in first.stderr
    resumed, info = _tpu_like_run("--resume", "--out", str(run), "--epochs", "3")
    assert "continuing after epoch 2" in resumed.stderr and info["precision"] == "mixed_bfloat16"
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0, 1, 2]
    assert _iterations(run / "checkpoints" / "epoch-003.keras") == 12  # the steps the schedule and stream count


def test_a_run_reads_shards_written_elsewhere_as_uint8_batches(small_sample, tmp_path):
    import tensorflow as tf

    from hpa_nb import train
    from hpa_nb.shards import write_shards

    shard_dir = tmp_path / "prepared"
    write_shards(small_sample, shard_dir, size=64, channels="rgb", progress=False)
    config = TrainConfig.make(True, data_dir=str(small_sample), out_dir=str(tmp_path / "run"),
                              shards=str(shard_dir), epochs=1)
    plan = train.prepare(config)
    assert plan.layout.startswith(f"compact shards {shard_dir} (40 images, 64 px, rgb, raw)")
    assert f"data: {plan.layout}" in plan.summary() and plan.config.shards == str(shard_dir)
    images, labels = next(iter(plan.datasets["train"]))
    val_images = next(iter(plan.datasets["val"]))[0]
    # a quarter of float32's bytes leave the host; the model's float32 input casts them in the compiled step
    assert images.dtype == val_images.dtype == tf.uint8 and images.shape[1:] == (64, 64, 3)
    assert plan.model.inputs[0].dtype == "float32"
