"""Data discovery order, Kaggle detection and backend choice."""

from pathlib import Path

import pytest

from hpa_nb.core import env
from hpa_nb.sample import sources
from hpa_nb.sample.writer import GENERATOR_VERSION


def _competition_tree(root: Path) -> Path:
    data = root / "competitions" / env.COMPETITION
    (data / "train").mkdir(parents=True)
    (data / "train.csv").write_text("ID,Label\n")
    decoy = root / "someones-weights"
    decoy.mkdir()
    (decoy / "model.h5").write_text("x")
    return data


def test_explicit_data_dir_wins_even_on_kaggle(tmp_path):
    _competition_tree(tmp_path / "input")
    chosen = tmp_path / "mine"
    chosen.mkdir()
    environ = {"HPA_DATA_DIR": str(chosen), "KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    source = sources.find_data(environ, input_root=tmp_path / "input")
    assert source.path == chosen and source.kind == "HPA_DATA_DIR"


def test_missing_explicit_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.find_data({"HPA_DATA_DIR": str(tmp_path / "nowhere")})


def test_kaggle_finds_nested_competition_mount(tmp_path):
    expected = _competition_tree(tmp_path / "input")
    source = sources.find_data({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, input_root=tmp_path / "input")
    assert source.kind == "kaggle" and source.path == expected


def test_competition_folder_beats_other_datasets_with_a_train_csv(tmp_path):
    root = tmp_path / "input"
    other = root / "aaa-other-dataset"
    other.mkdir(parents=True)
    (other / "train.csv").write_text("ID,Label\n")
    expected = _competition_tree(root)
    assert env.find_competition_dir(root) == expected


def test_off_kaggle_falls_back_to_the_cached_sample(tmp_path, monkeypatch):
    made = []

    def fake_write_sample(out, **spec):
        made.append(spec)
        Path(out, "train.csv").write_text("ID,Label\n")

    monkeypatch.setattr("hpa_nb.sample.writer.write_sample", fake_write_sample)
    environ = {"HPA_CACHE": str(tmp_path / "cache")}
    first = sources.find_data(environ)
    second = sources.find_data(environ)
    assert first.kind == "sample" and first.path == second.path
    assert first.path.parent == tmp_path / "cache" and (first.path / "train.csv").is_file()
    assert made == [sources.DEFAULT_SAMPLE]  # generated once, reused afterwards
    assert not [p for p in (tmp_path / "cache").iterdir() if p != first.path]  # no staging left behind


def test_kaggle_without_attached_data_also_falls_back_to_the_sample(tmp_path, monkeypatch):
    monkeypatch.setattr("hpa_nb.sample.writer.write_sample", lambda out, **spec: Path(out, "train.csv").write_text(""))
    environ = {"HPA_CACHE": str(tmp_path), "KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    source = sources.find_data(environ, input_root=tmp_path / "no-input")
    assert source.kind == "sample" and "no competition data" in source.reason


def test_working_dir_on_and_off_kaggle():
    assert env.working_dir({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}) == Path("/kaggle/working")
    assert env.working_dir({}) == Path("out")


def test_tpu_vm_without_tensorflow_tpu_selects_jax(monkeypatch):
    monkeypatch.setattr(env, "tensorflow_sees_tpu", lambda: False)
    monkeypatch.delitem(env.sys.modules, "keras", raising=False)
    environ = {"ISTPUVM": "1", "KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    assert env.select_backend(environ) == "jax" and environ["KERAS_BACKEND"] == "jax"


def test_tpu_vm_prefers_jax_even_beside_tensorflow_tpu(monkeypatch):
    installed = {"jax", "tensorflow-tpu"}
    monkeypatch.setattr(env, "_installed", lambda name: name in installed)
    monkeypatch.delitem(env.sys.modules, "keras", raising=False)
    environ = {"ISTPUVM": "1"}
    assert env.tensorflow_sees_tpu() and env.select_backend(environ) == "jax"
    installed.discard("jax")  # no JAX at all: TensorFlow drives the TPU
    assert env.select_backend({"ISTPUVM": "1"}) == "tensorflow"


def test_explicit_backend_and_non_tpu_machines_are_left_alone(monkeypatch):
    monkeypatch.setattr(env, "tensorflow_sees_tpu", lambda: False)
    monkeypatch.delitem(env.sys.modules, "keras", raising=False)
    explicit = {"ISTPUVM": "1", "KERAS_BACKEND": "tensorflow"}
    assert env.select_backend(explicit) == "tensorflow"
    plain: dict[str, str] = {}
    assert env.select_backend(plain) == "tensorflow" and "KERAS_BACKEND" not in plain


def test_hpa_out_overrides_the_working_dir(tmp_path):
    assert env.working_dir({"HPA_OUT": str(tmp_path), "KAGGLE_KERNEL_RUN_TYPE": "Batch"}) == tmp_path


def test_the_cached_sample_is_keyed_by_the_generator_version(tmp_path, monkeypatch):
    environ = {"HPA_CACHE": str(tmp_path)}
    first = sources.default_sample_dir(environ)

    monkeypatch.setattr("hpa_nb.sample.writer.GENERATOR_VERSION", GENERATOR_VERSION + 1)
    later = sources.default_sample_dir(environ)
    assert later != first and f"-v{GENERATOR_VERSION + 1}-" in later.name


def test_the_evaluation_sample_has_a_cache_folder_of_its_own(tmp_path):
    environ = {"HPA_CACHE": str(tmp_path)}
    default, evaluation = sources.default_sample_dir(environ), sources.sample_dir(sources.EVALUATION_SAMPLE, environ)
    assert default.name.endswith(f"-n{sources.DEFAULT_SAMPLE['images']}-s256-seed0-b8")  # the name caches already use
    assert evaluation != default and "-t400-" in evaluation.name and "-seed1-" in evaluation.name
    assert (
        sources.EVALUATION_SAMPLE["seed"] != sources.DEFAULT_SAMPLE["seed"]
    )  # never the images a default run trains on
