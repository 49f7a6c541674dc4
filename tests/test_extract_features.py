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
