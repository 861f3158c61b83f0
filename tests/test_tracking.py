"""Optional W&B tracking (`hpa_nb.training.tracking`): off in one line without wandb or a key; offline, the run
folder holds the W&B run with the config, every epoch's metrics and learning rate, and the final figures."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from hpa_nb.training import run, tracking


def test_tracking_is_off_in_one_line_without_wandb_or_a_key(monkeypatch, capsys, tmp_path):
    assert tracking.why_off({}).startswith("no W&B key: set WANDB_API_KEY")
    assert tracking.why_off({"WANDB_MODE": "offline"}) is None and tracking.why_off({"WANDB_API_KEY": "k"}) is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert tracking.start(tmp_path, {"epochs": 1}, environ={"WANDB_API_KEY": "k"}) is None
    assert (
        capsys.readouterr().err
        == "tracking: off (wandb is not installed (pip install wandb, or TRACK = True in 03_train))\n"
    )


def _records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``): a 7-byte header, then LevelDB-style blocks."""
    from wandb.proto import wandb_internal_pb2  # wandb: installed for the tests only

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # full or first; middle or last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _complete_log(path: Path, seconds: float = 60) -> list:
    """The records of a transaction log once it ends with its run's exit record: wandb's service process may
    still be writing it when the run's own process has exited (a `make test` failed once without this)."""
    deadline = time.monotonic() + seconds
    while True:
        records = list(_records(path))
        kinds = [record.WhichOneof("record_type") for record in records]
        if "exit" in kinds and "run" in kinds:
            return records
        assert time.monotonic() < deadline, f"{path} holds no complete run after {seconds} s: records {kinds}"
        time.sleep(0.5)


def _items(update) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_config_every_epoch_and_the_final_figures(
    small_sample, cli, monkeypatch, tmp_path
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "tracked"
    result = cli(
        "train",
        "--quick",
        "--data",
        small_sample,
        "--out",
        out,
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "4",
    )
    assert result.status == 0, result.err[-2000:]
    assert f"tracking: W&B run tracked (offline, under {out / 'wandb'})" in result.err
    logs = list((out / "wandb").glob(f"offline-run-*-{tracking.run_id(out)}/run-{tracking.run_id(out)}.wandb"))
    assert len(logs) == 1
    records = _complete_log(logs[0])
    started = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert started.display_name == "tracked" and started.project == tracking.PROJECT
    config = _items(started.config.update)
    assert config["backbone"] == "tiny" and config["image_size"] == 32 and config["replicas"] == 1
    epochs = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    history = run.load_history(out)
    assert [row["epoch"] for row in epochs] == [0, 1] == history["epoch"].tolist()
    for row, (_, saved) in zip(epochs, history.iterrows()):
        assert row["val_auc"] == pytest.approx(saved["val_auc"], rel=1e-6) and row["learning_rate"] > 0
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update(_items(record.summary.update))
    assert summary["final_val_auc"] == pytest.approx(run.load_info(out)["final"]["val_auc"], rel=1e-6)
    assert summary["epochs_run"] == 2
