"""What a kernel reads from the kernels before it (`hpa_nb.training.inputs`), laid out as Kaggle mounts it: at the
classic depth (/kaggle/input/<slug>) and nested (/kaggle/input/notebooks/<owner>/<slug>)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hpa_nb.core import env
from hpa_nb.data import shards, tiles
from hpa_nb.sample import sources
from hpa_nb.training import inputs, run, train

KAGGLE = {"KAGGLE_KERNEL_RUN_TYPE": "Batch"}


def _run_folder(folder: Path, level: str = "image", model: bool = True, **info) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run.CONFIG_FILE).write_text(json.dumps({"level": level, "epochs": 5, **info}))
    (folder / run.CHECKPOINT_DIR).mkdir(exist_ok=True)
    if model:
        (folder / run.MODEL_FILE).write_text("model")
    return folder


def _listing(folder: Path, name: str, file_format: str, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"format": file_format, "count": count}))
    return folder


@pytest.mark.parametrize("mount", ["hpa-03-train", "notebooks/alice/hpa-03-train"])
def test_each_artifact_is_found_by_its_marker_at_the_classic_depth_and_nested(tmp_path, mount):
    root = tmp_path / "input"
    image_run = _run_folder(root / mount / "run")
    cell_run = _run_folder(root / mount.replace("03-train", "07-cell-train") / "cell_run", level="cell")
    tile_dir = _listing(root / mount.replace("03-train", "06-cells") / "tiles", tiles.MANIFEST, tiles.TILE_FORMAT)
    shard_dir = _listing(
        root / mount.replace("03-train", "00-prepare") / "shards", shards.MANIFEST, shards.SHARD_FORMAT
    )
    found = {kind: inputs.find(kind, input_root=root, environ=KAGGLE) for kind in inputs.ARTIFACTS}
    assert found == {"image_run": image_run, "cell_run": cell_run, "tiles": tile_dir, "shards": shard_dir}
    # a reference still names one: OWNER/KERNEL, a bare slug or a folder
    assert inputs.find("image_run", "alice/hpa-03-train", input_root=root, environ=KAGGLE) == image_run
    assert inputs.find("cell_run", "hpa-07-cell-train", input_root=root, environ=KAGGLE) == cell_run
    assert inputs.find("tiles", tile_dir.parent, input_root=root, environ=KAGGLE) == tile_dir


def test_the_producers_own_output_wins_over_a_shallower_one(tmp_path):
    root = tmp_path / "input"
    other = _run_folder(root / "someones-dataset" / "run")
    own = _run_folder(root / "notebooks" / "alice" / "hpa-03-train" / "run")
    assert inputs.find("image_run", input_root=root, environ=KAGGLE) == own
    (own / run.MODEL_FILE).unlink()  # a run without its model is no image run: the other one is used
    assert inputs.find("image_run", input_root=root, environ=KAGGLE) == other


def test_every_run_attached_is_found_for_an_ensemble(tmp_path):
    root = tmp_path / "input"
    fold1 = _run_folder(root / "hpa-03-train-fold-1" / "run")
    fold0 = _run_folder(root / "notebooks" / "alice" / "hpa-03-train" / "run")
    _run_folder(root / "notebooks" / "alice" / "hpa-07-cell-train" / "cell_run", level="cell")
    assert inputs.find_all("image_run", input_root=root, environ=KAGGLE) == [fold0, fold1]  # the producer's first
    assert inputs.find_all("image_run", "hpa-03-train-fold-1, alice/hpa-03-train", input_root=root, environ=KAGGLE) == [
        fold1,
        fold0,
    ]
    assert inputs.find_all("cell_run", input_root=root, environ=KAGGLE) == [
        root / "notebooks" / "alice" / "hpa-07-cell-train" / "cell_run"
    ]
    with pytest.raises(inputs.MissingInputError, match="no cell tiles attached under"):
        inputs.find_all("tiles", input_root=root, environ=KAGGLE)
    assert inputs.find_all("tiles", input_root=root, environ=KAGGLE, required=False) == []


def test_a_run_of_the_other_level_or_without_a_model_is_not_taken(tmp_path):
    root = tmp_path / "input"
    _run_folder(root / "hpa-07-cell-train" / "cell_run", level="cell")
    stopped = _run_folder(root / "hpa-03-train" / "run", model=False)
    with pytest.raises(inputs.MissingInputError) as missing:
        inputs.find("image_run", input_root=root, environ=KAGGLE, consumer="04_evaluate")
    assert str(missing.value) == (
        f"no image run attached under {root}: attach the output of 03_train: python -m hpa_nb kaggle push "
        "04_evaluate (it attaches OWNER/hpa-03-train), or Add Input → Notebooks → hpa-03-train"
    )
    assert inputs.previous_run("alice/hpa-03-train", root) == stopped  # but it can be resumed
    assert inputs.previous_run("alice/hpa-03-train/4", root) == stopped  # one version of it, mounted by its slug
    assert inputs.find("cell_run", "alice/hpa-07-cell-train/2", input_root=root, environ=KAGGLE) == (
        root / "hpa-07-cell-train" / "cell_run"
    )
    assert inputs.previous_run(stopped.parent, root) == stopped
    with pytest.raises(
        inputs.MissingInputError, match="RESUME_FROM alice/other: no run folder .* push NAME --resume-from OWNER/KERNEL"
    ):
        inputs.previous_run("alice/other", root)


def test_nothing_attached_on_kaggle_names_what_to_attach_and_how(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    with pytest.raises(
        inputs.MissingInputError,
        match="push 05_submission --attach 07_cell_train "
        r"\(it attaches OWNER/hpa-07-cell-train\)",
    ):
        inputs.find("cell_run", input_root=root, environ=KAGGLE, consumer="05_submission")
    assert inputs.find("cell_run", input_root=root, environ=KAGGLE, required=False) is None
    with pytest.raises(inputs.MissingInputError, match="RUN_DIR bob/other: no image run in the attached output"):
        inputs.find("image_run", "bob/other", input_root=root, environ=KAGGLE)


def test_on_kaggle_a_missing_image_run_is_never_replaced_by_a_trained_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HPA_KAGGLE_ROOT", str(tmp_path / "kaggle"))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    (tmp_path / "kaggle" / "input").mkdir(parents=True)
    monkeypatch.setattr(train, "train", lambda config: pytest.fail("trained a substitute model on Kaggle"))
    with pytest.raises(inputs.MissingInputError, match="no image run attached"):
        train.image_run(None, consumer="05_submission")


def test_off_kaggle_a_missing_run_is_trained_quickly_once_in_the_default_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HPA_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    calls = []

    def fake_train(config):
        calls.append(config)
        _run_folder(Path(config.runtime.out_dir))

    monkeypatch.setattr(train, "train", fake_train)
    first = train.image_run(None)
    second = train.image_run(None)
    assert first == second == tmp_path / "out" / "run"
    assert len(calls) == 1 and calls[0].runtime.quick and calls[0].runtime.out_dir == str(first)


def test_shards_are_told_from_another_data_sets_manifest_json(tmp_path):
    root = tmp_path / "input"
    _listing(root / "some-dataset", shards.MANIFEST, "something-else")
    assert inputs.find("shards", input_root=root, environ=KAGGLE, required=False) is None
    assert not shards.is_shard_folder(tmp_path / "nowhere")


def test_the_data_is_found_again_where_the_next_kernel_mounts_it(small_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("HPA_KAGGLE_ROOT", str(tmp_path / "kaggle"))
    # trained where the competition was mounted nested; the next kernel has it at the classic depth
    trained_on = tmp_path / "kaggle" / "input" / "competitions" / env.COMPETITION
    now = tmp_path / "kaggle" / "input" / env.COMPETITION
    shutil.copytree(small_sample, now)
    (now / "sample.json").unlink()  # the competition itself, not a sample
    folder = _run_folder(tmp_path / "run", data_dir=str(trained_on), data_source=sources.source_record(trained_on))
    assert run.load_info(folder)["data_source"] == {"kind": "competition", "slug": env.COMPETITION}
    assert inputs.run_data(folder) == now
    assert inputs.run_data(folder, tmp_path / "given") == tmp_path / "given"  # DATA_DIR still wins
    shutil.rmtree(now)
    with pytest.raises(FileNotFoundError, match="trained on the competition data .* which is not attached here"):
        inputs.run_data(folder)


def test_a_run_on_a_sample_finds_the_same_sample_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    spec = {"images": 6, "size": 32, "seed": 4, "bit_depth": 8, "test_images": 2}
    sample = sources.ensure_sample(spec)
    record = sources.source_record(sample)
    assert record == {"kind": "sample", "spec": spec}
    folder = _run_folder(tmp_path / "run", data_dir=str(tmp_path / "gone"), data_source=record)
    assert inputs.run_data(folder) == sample
    plain = _run_folder(tmp_path / "run2", data_dir=str(tmp_path / "gone"), data_source={"kind": "folder"})
    with pytest.raises(FileNotFoundError, match="does not exist here: set DATA_DIR"):
        inputs.run_data(plain)


def test_an_input_that_holds_nothing_is_refused(tmp_path, cli):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "train.csv").write_text("ID,Label\n")
    result = cli("shard", "--src", tmp_path / "empty", "--out", tmp_path / "shards", "--size", "16")
    result.assert_one_error_line(f"{tmp_path / 'empty' / 'train.csv'} has no rows: there are no images to read")
    assert not (tmp_path / "shards" / shards.MANIFEST).exists()
    _listing(tmp_path / "listed", shards.MANIFEST, shards.SHARD_FORMAT, count=0)
    with pytest.raises(ValueError, match="lists no records: an empty folder of compact shards is no input"):
        shards.read_manifest(tmp_path / "listed")
