"""finetune: the top `finetune.unfreeze` conv layers of VGG16 trained with the head.

Without augmentation the frozen layers are never recomputed: the unfrozen layers and the
head train on the activations extract_features cached at the last frozen layer, which is
exactly the same model as the full network. With `finetune.augment: true` the full network
trains on augmented photos (the slow path, needed because augmentation changes the input).
Writes models/finetuned.keras (complete: raw photos in), metrics/finetune.json, plots/finetune/.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import catalog
from pipeline.params import Params, load_params
from pipeline.stages.common import (
    Distribution,
    Trained,
    distribution_scope,
    log_training_data,
    publish_training,
    start_training,
)
from pipeline.stages.vgg_common import (
    CachedSplits,
    Splits,
    cached_class_names,
    compile_classifier,
    fit_and_test,
    head_of,
    vgg_figures,
)

if TYPE_CHECKING:
    from pipeline.tracking import StageRun

STAGE = catalog.STAGES["finetune"]
HEAD_MODEL = catalog.MODELS["feature_extraction"].model


def augmentation(seed: int):
    """Random flips, small rotations and zooms, as in the classic cats-vs-dogs recipe."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.2, seed=seed),
        ],
        name="augmentation",
    )


def finetune(
    head_model: Path,
    features: Splits,
    photos: Splits,
    num_classes: int,
    params: Params,
    distribution: Distribution | None = None,
    run: StageRun | None = None,
) -> Trained:
    """Fine-tune the trained head in `head_model` (the feature-extraction classifier) with its
    VGG16's top `finetune.unfreeze` conv layers, on the cached `features` ({split: (activations
    at the last frozen layer, labels)}), or with `finetune.augment` on the augmented `photos`.
    Returns the fitted model and, to save, the complete classifier (raw photos in).
    `distribution` and `run` as for `train_baseline`."""
    import keras

    from pipeline.models.vgg import assemble_classifier, build_finetune_model, split_at_last_frozen_layer

    p = params.finetune
    scope, replicas = distribution or distribution_scope(params.train)
    with scope:  # every variable the training touches is made under the strategy
        trained_head = keras.models.load_model(head_model)
        image_shape = trained_head.input_shape[1:]
        # Its VGG16 layers are the conv base: the weights of catalog.WEIGHTS, frozen while the
        # head trained (one VGG16 in memory, not a second one loaded from the weights file).
        conv_base = trained_head
        _, top = split_at_last_frozen_layer(conv_base, p.unfreeze)
        head = head_of(trained_head, top.output_shape[1:])
        classifier = assemble_classifier(conv_base, head, p.unfreeze)
        if p.augment:
            # The slow, exact path: every epoch runs the whole network on augmented photos.
            image = keras.Input(shape=image_shape)
            model = keras.Model(image, classifier(augmentation(params.seed)(image)))
            splits = photos
        else:
            model = build_finetune_model(top, head)
            splits = features
        compile_classifier(model, num_classes, p)
    return fit_and_test(model, splits, p, params, replicas, run, test_batch_size=64, saved_model=classifier)


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    from pipeline.tracking import tracked

    distribution = start_training(params, *catalog.upstream(STAGE))
    features = CachedSplits("frozen")  # each split read when the training or the test needs it
    class_names = cached_class_names()
    # The photos train only with augment; else the test ones give the figures and the example.
    with np.load(catalog.IMAGES) as data:
        splits = ("train", "validation", "test") if params.finetune.augment else ("test",)
        photos = {split: (data[f"x_{split}"], data[f"y_{split}"]) for split in splits}
    with tracked(STAGE, params) as run:
        log_training_data(run)
        trained = finetune(HEAD_MODEL, features, photos, len(class_names), params, distribution, run)
        del features  # hundreds of MB the rest of the stage does not need
        test_photos = photos["test"][0]
        figures = vgg_figures(trained.to_save, test_photos[0], ("block5_conv1", "block5_conv3"))
        publish_training(run, trained, figures=figures, example=test_photos[:2])
