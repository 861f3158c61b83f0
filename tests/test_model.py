"""hpa_nb.training.model: the sigmoid head, the 4-channel weight transplant, the weighted loss, metrics, save/load."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from keras.src.applications import efficientnet
from keras.src.legacy.saving import legacy_h5_format

from hpa_nb.core.labels import N_CLASSES
from hpa_nb.core.metrics import roc_auc
from hpa_nb.training import model as model_lib
from hpa_nb.training import run
from hpa_nb.training.run import RunFolder

keras = pytest.importorskip("keras")

SIZE = 32


def _images(count: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, SIZE, SIZE, channels)).astype("float32")


@pytest.fixture(scope="module")
def tiny() -> keras.Model:
    return model_lib.build("tiny", SIZE, "rgby", weights=None, dropout=0.5)


def test_head_gives_independent_sigmoid_probabilities(tiny):
    head = tiny.get_layer("probabilities")
    assert head.activation is keras.activations.sigmoid
    assert tiny.output.shape[-1] == N_CLASSES and tiny.output.dtype == "float32"
    images = _images(4, 4)
    before = tiny.predict(images, verbose=0)
    assert np.all((before > 0) & (before < 1))
    assert not np.allclose(before.sum(axis=1), 1.0)  # not a softmax
    kernel, bias = head.get_weights()
    shifted = bias.copy()
    shifted[3] += 2.0
    head.set_weights([kernel, shifted])
    try:
        after = tiny.predict(images, verbose=0)
    finally:
        head.set_weights([kernel, bias])
    others = [c for c in range(N_CLASSES) if c != 3]
    assert np.all(after[:, 3] > before[:, 3])
    np.testing.assert_allclose(after[:, others], before[:, others], rtol=1e-6)


def test_inference_mode_uses_moving_statistics_not_the_batch(tiny):
    images = _images(6, 4, seed=1)
    alone = tiny(images[:1], training=False)
    in_batch = tiny(images, training=False)[:1]
    np.testing.assert_allclose(np.asarray(alone), np.asarray(in_batch), rtol=1e-4, atol=1e-6)
    assert model_lib.count_parameters(tiny.get_layer("backbone")) < 1_500_000


@pytest.fixture(scope="module")
def b0_weights_file(tmp_path_factory) -> str:
    """A 3-channel EfficientNetB0 backbone's weights with non-trivial input statistics, as a user would attach."""
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    normalization = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    normalization.set_weights(
        [np.array([0.485, 0.456, 0.406], "float32"), np.array([0.052, 0.050, 0.051], "float32"), np.array(0)]
    )
    path = tmp_path_factory.mktemp("weights") / "b0.weights.h5"
    source.save_weights(path)
    return str(path)


@pytest.mark.slow  # builds EfficientNetB0 (its weights file too)
def test_four_channel_transplant_extends_the_stem_with_the_rgb_mean(b0_weights_file):
    three = model_lib.build("efficientnetb0", SIZE, "rgb", weights=b0_weights_file).get_layer("backbone")
    four = model_lib.build("efficientnetb0", SIZE, "rgby", weights=b0_weights_file).get_layer("backbone")
    stem3, stem4 = three.get_layer("stem_conv").kernel.numpy(), four.get_layer("stem_conv").kernel.numpy()
    assert stem4.shape == (3, 3, 4, stem3.shape[-1])
    np.testing.assert_array_equal(stem4[:, :, :3], stem3)
    np.testing.assert_allclose(stem4[:, :, 3], stem3.mean(axis=2), rtol=1e-6)
    weighted3 = [layer for layer in three.layers if layer.weights]
    weighted4 = [layer for layer in four.layers if layer.weights]
    assert len(weighted3) == len(weighted4) > 100
    for layer3, layer4 in zip(weighted3, weighted4):
        for value3, value4 in zip(layer3.get_weights(), layer4.get_weights()):
            if layer3.name == "stem_conv":
                continue
            if isinstance(layer4, keras.layers.Normalization) and np.ndim(value4) == 1:
                np.testing.assert_array_equal(value4[:3], value3)
                assert value4[3] == pytest.approx(value3.mean())
            else:
                np.testing.assert_array_equal(value4, value3, err_msg=layer3.name)


@pytest.mark.slow  # builds EfficientNetB0 (its weights file too)
def test_three_channel_weights_file_reproduces_the_source_backbone(b0_weights_file):
    source = keras.applications.EfficientNetB0(include_top=False, weights=b0_weights_file, input_shape=(SIZE, SIZE, 3))
    built = model_lib.build("efficientnetb0", SIZE, "rgb", weights=b0_weights_file).get_layer("backbone")
    images = _images(2)
    np.testing.assert_allclose(np.asarray(built(images)), np.asarray(source(images)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # builds EfficientNetB0 twice
def test_keras_imagenet_file_given_as_a_path_matches_weights_imagenet(tmp_path, monkeypatch):
    """Keras's ImageNet .h5 stores the std where the variance belongs; a path must get the same correction."""
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    normalization = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    normalization.set_weights(
        [np.array(model_lib.IMAGENET_MEAN, "float32"), np.array(model_lib.IMAGENET_STDDEV, "float32"), np.array(0)]
    )
    legacy = tmp_path / "efficientnetb0_notop.h5"
    with h5py.File(legacy, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *args, **kwargs: str(legacy))
    reference = keras.applications.EfficientNetB0(include_top=False, weights="imagenet", input_shape=(SIZE, SIZE, 3))
    images = _images(2)
    for weights in ("imagenet", str(legacy)):
        built = model_lib.build("efficientnetb0", SIZE, "rgb", weights=weights).get_layer("backbone")
        np.testing.assert_allclose(np.asarray(built(images)), np.asarray(reference(images)), rtol=1e-4, atol=1e-4)


def test_v2_backbone_normalises_a_fourth_channel_with_the_mean_imagenet_statistics():
    backbone = model_lib.build_backbone("efficientnetv2b0", SIZE, "rgby", weights=None)
    normalize = backbone.get_layer("v2_normalize")
    mean = np.asarray(normalize.mean).reshape(-1)
    np.testing.assert_allclose(mean, [*model_lib.IMAGENET_MEAN, np.mean(model_lib.IMAGENET_MEAN)], rtol=1e-6)


def test_unreachable_imagenet_weights_explain_the_kaggle_way(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: [Errno -2] Name or service not known")

    monkeypatch.setattr(efficientnet.file_utils, "get_file", offline)
    with pytest.raises(model_lib.WeightsUnavailableError) as caught:
        model_lib.build("efficientnetb0", SIZE, "rgb", weights="imagenet")
    message = str(caught.value)
    assert "--weights" in message and "none" in message and "Kaggle" in message
    assert isinstance(caught.value, ValueError)  # the CLI prints it as one line


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"backbone": "resnet50"}, ValueError),
        ({"channels": "rgbk"}, ValueError),
        ({"weights": "/no/such/file.weights.h5"}, FileNotFoundError),
    ],
)
def test_bad_arguments_raise_user_errors(kwargs, error):
    with pytest.raises(error):
        model_lib.build(**{"backbone": "tiny", "image_size": SIZE, "weights": None, **kwargs})


def test_positive_weights_scale_only_the_positive_term():
    rng = np.random.default_rng(0)
    y_true = (rng.uniform(size=(8, N_CLASSES)) < 0.3).astype("float32")
    y_pred = rng.uniform(0.05, 0.95, size=(8, N_CLASSES)).astype("float32")
    weights = np.linspace(1, 20, N_CLASSES).astype("float32")
    loss = model_lib.WeightedBinaryCrossentropy(weights, reduction=None)
    expected = -(weights * y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred)).mean(axis=1)
    np.testing.assert_allclose(np.asarray(loss(y_true, y_pred)), expected, rtol=1e-5)
    negatives = np.zeros_like(y_true)  # no positives: the weights change nothing
    unweighted = model_lib.WeightedBinaryCrossentropy(None, reduction=None)
    np.testing.assert_allclose(
        np.asarray(loss(negatives, y_pred)), np.asarray(unweighted(negatives, y_pred)), rtol=1e-6
    )


def test_focal_loss_discounts_confident_correct_predictions():
    y_true = np.array([[1.0] + [0.0] * (N_CLASSES - 1)], "float32")
    confident = np.array([[0.95] + [0.05] * (N_CLASSES - 1)], "float32")
    wrong = np.array([[0.05] + [0.95] * (N_CLASSES - 1)], "float32")
    bce = model_lib.WeightedBinaryCrossentropy(None)
    focal = model_lib.WeightedBinaryCrossentropy(None, focal_gamma=2.0)
    assert float(focal(y_true, confident)) < 0.01 * float(bce(y_true, confident))
    assert float(focal(y_true, wrong)) > 0.8 * float(bce(y_true, wrong))


def test_loss_survives_serialization():
    loss = model_lib.WeightedBinaryCrossentropy([2.0] * N_CLASSES, focal_gamma=1.5)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, model_lib.WeightedBinaryCrossentropy)
    assert restored.positive_weights == loss.positive_weights and restored.focal_gamma == 1.5


def test_auc_metric_leaves_out_classes_absent_from_validation():
    rng = np.random.default_rng(3)
    y_true = (rng.uniform(size=(40, N_CLASSES)) < 0.4).astype("float32")
    y_true[:, 5] = 0  # no positives: AUC undefined
    y_score = np.clip(y_true * 0.3 + rng.uniform(size=y_true.shape) * 0.7, 0, 1).astype("float32")
    present = (y_true.sum(axis=0) > 0).astype("float32")
    auc, _ = model_lib.make_metrics(present)
    auc.update_state(y_true, y_score)
    expected = np.mean([roc_auc(y_true[:, c], y_score[:, c]) for c in range(N_CLASSES) if present[c]])
    assert float(auc.result()) == pytest.approx(expected, abs=0.01)


def test_save_and_load_round_trip_gives_the_same_predictions(tmp_path):
    model = model_lib.build("tiny", SIZE, "rgb", weights=None)
    model.compile(
        optimizer="adam", loss=model_lib.WeightedBinaryCrossentropy([3.0] * N_CLASSES), metrics=model_lib.make_metrics()
    )
    images, labels = _images(8), np.eye(N_CLASSES, dtype="float32")[np.arange(8)]
    model.fit(images, labels, epochs=1, batch_size=4, verbose=0)
    (tmp_path / "run").mkdir()
    model.save(RunFolder(tmp_path / "run").model)
    loaded = run.load_model(tmp_path / "run")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5)
    with pytest.raises(FileNotFoundError):
        run.load_model(tmp_path / "missing")


def test_backbone_weights_written_from_a_trained_model_seed_a_new_one(tmp_path):
    trained = model_lib.build("efficientnetv2b0", SIZE, "rgb", weights=None)
    path = model_lib.save_backbone_weights(trained, tmp_path / "v2.weights.h5")
    seeded = model_lib.build("efficientnetv2b0", SIZE, "rgby", weights=path)
    inner = [layer for layer in seeded.get_layer("backbone").layers if isinstance(layer, keras.Model)][0]
    source = [layer for layer in trained.get_layer("backbone").layers if isinstance(layer, keras.Model)][0]
    np.testing.assert_array_equal(
        inner.get_layer("block1a_project_conv").kernel.numpy(), source.get_layer("block1a_project_conv").kernel.numpy()
    )


def test_backbone_weights_are_written_atomically(tiny, tmp_path, monkeypatch):
    path = tmp_path / "tiny.weights.h5"
    path.write_bytes(b"previous weights")

    def crash(self, filepath, *args, **kwargs):
        assert str(filepath).endswith(".weights.h5")  # Keras insists on the suffix
        Path(filepath).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save_weights", crash)
    with pytest.raises(OSError):
        model_lib.save_backbone_weights(tiny, path)
    assert path.read_bytes() == b"previous weights" and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    model_lib.save_backbone_weights(tiny, path)
    model_lib.build("tiny", SIZE, "rgby", weights=path)  # the file loads
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_kaggle_models_handle_is_read_from_where_kaggle_mounted_it(tmp_path):
    from hpa_nb.training.presets import is_preset, resolve_preset

    root = tmp_path / "kaggle"
    for version in ("1", "3"):
        folder = root / "input" / "resnetv1" / "keras" / "resnet_50_imagenet" / version
        folder.mkdir(parents=True)
        for name in ("config.json", "metadata.json"):
            (folder / name).write_text("{}")
    on_kaggle = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "HPA_KAGGLE_ROOT": str(root)}
    handle = "kaggle://keras/resnetv1/keras/resnet_50_imagenet"
    assert resolve_preset(f"{handle}/1", on_kaggle) == str(root / "input/resnetv1/keras/resnet_50_imagenet/1")
    assert resolve_preset(handle, on_kaggle) == str(root / "input/resnetv1/keras/resnet_50_imagenet/3")  # the newest
    assert resolve_preset(handle, {}) == handle  # off Kaggle KerasHub downloads it
    assert resolve_preset("kaggle://keras/other/keras/x", on_kaggle) == "kaggle://keras/other/keras/x"
    assert is_preset(handle) and is_preset(str(root / "input/resnetv1/keras/resnet_50_imagenet/1"))
    assert not is_preset("tiny") and not is_preset(str(tmp_path))
