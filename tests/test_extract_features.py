"""The activation cache: batches into memory maps, the mirrored and augmented training rows,
and the checks before anything is written."""

from pathlib import Path

import keras
import numpy as np
import pytest
from tqdm import tqdm

from conftest import assert_float32_close, shipped_params, write_yaml
from pipeline.errors import UserError, raise_if_signalled
from pipeline.models.augmentation import AugmentationFactors, augment_batch
from pipeline.params import parse_params
from pipeline.stages.extract_features import Augmented, extract

FACTORS = AugmentationFactors(rotation=0.05, zoom=0.15, shift=0.1, brightness=0.15, contrast=0.15)


def tiny_extractor() -> keras.Model:
    """Two outputs like the real extractor: an asymmetric conv map, and a pooled one."""
    image = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(2, 3, kernel_initializer=keras.initializers.RandomNormal(seed=1))(image)
    return keras.Model(image, [conv, keras.layers.GlobalAveragePooling2D()(conv)])


def test_every_row_is_the_activation_of_its_photo(tmp_path):
    model = tiny_extractor()
    photos = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3)).astype(np.uint8)
    extract(model, photos, 2, tmp_path / "f.npy", tmp_path / "p.npy", mirrored=True)
    frozen, pooled = np.load(tmp_path / "f.npy"), np.load(tmp_path / "p.npy")
    assert frozen.shape == (10, 4, 4, 2) and pooled.shape == (10, 2)
    expected, expected_pooled = model.predict(photos, verbose=0)
    mirrored, mirrored_pooled = model.predict(photos[:, :, ::-1], verbose=0)
    # The stage predicts in batches of 2, the test in one batch: other kernels (conftest)
    assert_float32_close(frozen[:5], expected)
    assert_float32_close(frozen[5:], mirrored)
    assert_float32_close(pooled[:5], expected_pooled)
    assert_float32_close(pooled[5:], mirrored_pooled)
    assert not np.allclose(frozen[5:], frozen[:5]), "a mirror image is a different input"


def test_without_mirroring_rows_match_photos(tmp_path):
    model = tiny_extractor()
    photos = np.random.default_rng(1).integers(0, 256, (3, 6, 6, 3)).astype(np.uint8)
    extract(model, photos, 32, tmp_path / "f.npy", tmp_path / "p.npy")
    assert_float32_close(np.load(tmp_path / "f.npy"), model.predict(photos, verbose=0)[0])


def test_each_augmented_row_is_the_activation_of_its_augmented_photo(tmp_path):
    model = tiny_extractor()
    photos = np.random.default_rng(2).integers(0, 256, (5, 6, 6, 3)).astype(np.uint8)
    augmented = Augmented(copies=2, factors=FACTORS, seed=7)
    extract(model, photos, 2, tmp_path / "f.npy", tmp_path / "p.npy", mirrored=True, augmented=augmented)
    frozen, pooled = np.load(tmp_path / "f.npy"), np.load(tmp_path / "p.npy")
    assert frozen.shape == (20, 4, 4, 2) and pooled.shape == (20, 2)
    assert_float32_close(frozen[:5], model.predict(photos, verbose=0)[0])
    assert_float32_close(frozen[5:10], model.predict(photos[:, :, ::-1], verbose=0)[0])
    for copy in (1, 2):
        # The augmented photos, rebuilt batch by batch as the stage made them (2 per batch)
        photos_k = np.concatenate([augment_batch(photos[i : i + 2], FACTORS, 7, copy, i) for i in (0, 2, 4)])
        rows = slice(5 * (copy + 1), 5 * (copy + 2))
        expected, expected_pooled = model.predict(photos_k, verbose=0)
        assert_float32_close(frozen[rows], expected)
        assert_float32_close(pooled[rows], expected_pooled)
        assert not np.allclose(photos_k, photos), "an augmented photo differs from its original"
    assert not np.allclose(frozen[10:15], frozen[15:20]), "two copies draw different augmentations"


def test_augmentation_is_seeded():
    photos = np.random.default_rng(3).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    first = augment_batch(photos, FACTORS, 7, 1, 0)
    np.testing.assert_array_equal(first, augment_batch(photos, FACTORS, 7, 1, 0))
    assert not np.array_equal(first, augment_batch(photos, FACTORS, 8, 1, 0))
    assert first.dtype == np.float32 and first.min() >= 0 and first.max() <= 255


def extract_before_augmentation(extractor, images, batch_size, frozen_out, pooled_out, mirrored=False):
    """extract() as it was before features.augment_copies, verbatim: today's cache."""
    shapes = [tuple(t.shape[1:]) for t in extractor.outputs]
    rows = len(images) * (2 if mirrored else 1)
    frozen = np.lib.format.open_memmap(frozen_out, "w+", np.float32, (rows, *shapes[0]))
    pooled = np.lib.format.open_memmap(pooled_out, "w+", np.float32, (rows, *shapes[1]))
    starts = [(start, False) for start in range(0, len(images), batch_size)]
    if mirrored:
        starts += [(start, True) for start, _ in starts]
    for start, flip in tqdm(starts, desc=frozen_out.stem, unit="batch"):
        raise_if_signalled()
        batch = images[start : start + batch_size]
        cached, head_input = extractor.predict_on_batch(batch[:, :, ::-1] if flip else batch)
        row = start + (len(images) if flip else 0)
        frozen[row : row + len(batch)] = cached
        pooled[row : row + len(batch)] = head_input
    frozen.flush()
    pooled.flush()
    del frozen, pooled


@pytest.mark.parametrize("mirrored", [True, False])
def test_no_augmented_copies_gives_todays_cache_byte_for_byte(tmp_path, mirrored):
    model = tiny_extractor()
    photos = np.random.default_rng(4).integers(0, 256, (5, 6, 6, 3)).astype(np.uint8)
    extract_before_augmentation(model, photos, 2, tmp_path / "f0.npy", tmp_path / "p0.npy", mirrored)
    extract(model, photos, 2, tmp_path / "f.npy", tmp_path / "p.npy", mirrored, augmented=None)
    for name in ("f", "p"):
        assert (tmp_path / f"{name}.npy").read_bytes() == (tmp_path / f"{name}0.npy").read_bytes()


def test_negative_augment_copies_is_a_params_error():
    raw = shipped_params()
    raw["features"]["augment_copies"] = -1
    with pytest.raises(UserError, match=r"features\.augment_copies: .*greater than or equal to 0"):
        parse_params(raw)


def test_more_copies_than_the_disk_holds_stop_before_anything_is_written(workdir, monkeypatch):
    from pipeline import catalog
    from pipeline.stages import extract_features

    raw = shipped_params()
    raw["features"]["augment_copies"] = 10**9
    write_yaml(workdir / "params.yaml", raw)
    catalog.WEIGHTS.parent.mkdir(parents=True)
    catalog.WEIGHTS.touch()
    monkeypatch.setattr(extract_features, "feature_extractor", lambda *args: tiny_extractor())
    rng = np.random.default_rng(0)
    splits = {f"x_{s}": rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8) for s in ("train", "validation", "test")}
    labels = {f"y_{s}": np.array([0, 1]) for s in ("train", "validation", "test")}
    catalog.IMAGES.parent.mkdir(parents=True)
    np.savez(catalog.IMAGES, class_names=np.array(["cat", "dog"]), **splits, **labels)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    before = sorted(Path(".").rglob("*"))
    with pytest.raises(UserError, match=r"data: the feature cache needs .* GiB but the disk has .* GiB free"):
        extract_features.run(Path("params.yaml"))
    assert sorted(Path(".").rglob("*")) == before, "nothing is written"
def test_pooled_block_outputs_of_the_same_pass_equal_a_forward_pass(tmp_path):
    """VGG16 (random weights, 32 px): the extractor's block3/4/5 taps, written by extract()
    beside the cut and block5_pool, are each block's pooled output of a plain forward pass."""
    from pipeline.models.vgg import build_conv_base
    from pipeline.stages.extract_features import block_features_file, feature_extractor

    keras.utils.set_random_seed(0)
    extractor = feature_extractor(None, (32, 32, 3), unfreeze=3, pooled_blocks=(3, 4, 5))
    assert len(extractor.outputs) == 5
    photos = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    blocks = [tmp_path / block_features_file("train", block) for block in (3, 4, 5)]
    extract(extractor, photos, 2, tmp_path / "f.npy", tmp_path / "p.npy", mirrored=True, blocks_out=blocks)

    # The same weights as a plain Keras VGG16 with keras.applications' own preprocessing.
    conv_base = build_conv_base(None, (32, 32, 3))
    for layer in conv_base.layers[1:]:
        layer.set_weights(extractor.get_layer(layer.name).get_weights())
    both = np.concatenate([photos, photos[:, :, ::-1]]).astype(np.float32)
    preprocessed = keras.applications.vgg16.preprocess_input(both.copy())
    for block, path in zip((3, 4, 5), blocks):
        upto = keras.Model(conv_base.input, conv_base.get_layer(f"block{block}_pool").output)
        expected = upto.predict(preprocessed, verbose=0).mean(axis=(1, 2))
        cached = np.load(path)
        assert cached.shape == (6, expected.shape[1])
        assert_float32_close(cached, expected, err_msg=f"block{block}")
    block4 = keras.Model(conv_base.input, conv_base.get_layer("block4_pool").output).predict(preprocessed, verbose=0)
    assert_float32_close(np.load(tmp_path / "f.npy"), block4)  # the cut of unfreeze 3, as before
    assert_float32_close(np.load(tmp_path / "p.npy"), conv_base.predict(preprocessed, verbose=0))
