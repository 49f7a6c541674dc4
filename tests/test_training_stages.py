"""train_head and finetune as functions, outside their stage's run(): tiny VGG16 (random
weights, 32 px photos), one epoch each; the classifier each saves is the model it trained."""

from __future__ import annotations

import numpy as np
import pytest
from ruamel.yaml import YAML

from conftest import REPO, write_vgg16_weights

SIZE = 32

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def tiny_params():
    from pipeline.params import parse_params

    raw = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    raw["head"].update(units=4, epochs=1, batch_size=2)
    raw["finetune"].update(epochs=1, batch_size=2, early_stopping_patience=0)
    return parse_params(raw)


def test_train_head_then_finetune_save_the_models_they_trained(tmp_path, monkeypatch):
    from pipeline import catalog
    from pipeline.stages.common import save_model, seed_everything
    from pipeline.stages.extract_features import feature_extractor
    from pipeline.stages.finetune import finetune
    from pipeline.stages.train_head import train_head

    monkeypatch.chdir(tmp_path)
    catalog.WEIGHTS.parent.mkdir(parents=True)
    write_vgg16_weights(catalog.WEIGHTS)
    params = tiny_params()
    seed_everything(params.seed)
    rng = np.random.default_rng(0)
    photos = {split: (rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8), np.array([0, 1, 0, 1]))
              for split in ("train", "validation", "test")}
    extractor = feature_extractor(str(catalog.WEIGHTS), (SIZE, SIZE, 3), params.finetune.unfreeze)
    cached = {split: extractor.predict(images, verbose=0) for split, (images, _) in photos.items()}
    frozen = {split: (cached[split][0], labels) for split, (_, labels) in photos.items()}
    pooled = {split: (cached[split][1], labels) for split, (_, labels) in photos.items()}

    head = train_head(pooled, 2, (SIZE, SIZE, 3), params)
    assert len(head.fit.history) == 1 and 0.0 <= head.test_accuracy <= 1.0
    np.testing.assert_allclose(head.to_save.predict(photos["test"][0], verbose=0),
                               head.model.predict(pooled["test"][0], verbose=0), rtol=1e-4, atol=1e-5)
    save_model(head.to_save, tmp_path / "head.keras")

    tuned = finetune(tmp_path / "head.keras", frozen, photos, 2, params)
    assert len(tuned.fit.history) == 1
    np.testing.assert_allclose(tuned.to_save.predict(photos["test"][0], verbose=0),
                               tuned.model.predict(frozen["test"][0], verbose=0), rtol=1e-4, atol=1e-5)
