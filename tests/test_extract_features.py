"""The activation cache: batches into memory maps, and the mirrored training rows."""

import keras
import numpy as np

from conftest import assert_float32_close
from pipeline.stages.extract_features import extract


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
