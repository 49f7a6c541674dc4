"""finetune: the top `finetune.unfreeze` conv layers of VGG16 trained with the head.

Without augmentation the frozen layers are never recomputed: the unfrozen layers and the
head train on the activations extract_features cached at the last frozen layer, which is
exactly the same model as the full network. With `finetune.augment: true` the full network
trains on augmented photos (the slow path, needed because augmentation changes the input).
Writes models/finetuned.keras (complete: raw photos in), metrics/finetune.json, plots/finetune/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.params import load_params
from pipeline.stages.common import fit, publish_training, start_training
from pipeline.stages.vgg_common import FEATURES, IMAGES, WEIGHTS, head_of, load_features, loss_for, vgg_figures

STAGE = "finetune"
HEAD_MODEL = Path("models/head.keras")
MODEL = Path("models/finetuned.keras")
METRICS = Path("metrics/finetune.json")
PLOTS = Path("plots/finetune")


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


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    import keras

    from pipeline.models.optimizer import make_optimizer
    from pipeline.models.vgg import assemble_classifier, build_conv_base, build_finetune_model, split_at_last_frozen_layer
    from pipeline.tracking import stage_run

    p = params.finetune
    scope, replicas = start_training(params, (FEATURES, "extract_features"), (HEAD_MODEL, "train_head"))
    splits, class_names = load_features("frozen")
    with np.load(IMAGES) as data:
        photos = {split: (data[f"x_{split}"], data[f"y_{split}"]) for split in ("train", "validation", "test")}
    stage_params = {"seed": params.seed, "finetune": p.model_dump(), "train": params.train.model_dump()}
    inputs = [FEATURES, HEAD_MODEL, WEIGHTS] + ([IMAGES] if p.augment else [])
    with stage_run(STAGE, stage_params, inputs, params.mlflow.experiment) as run:
        with scope:  # every variable the training touches is made under the strategy
            trained_head = keras.models.load_model(HEAD_MODEL)
            image_shape = trained_head.input_shape[1:]
            conv_base = build_conv_base(str(WEIGHTS), image_shape)
            frozen, top = split_at_last_frozen_layer(conv_base, p.unfreeze)
            head = head_of(trained_head, top.output_shape[1:])
            classifier = assemble_classifier(conv_base, head, p.unfreeze)
            if p.augment:
                # The slow, exact path: every epoch runs the whole network on augmented photos.
                image = keras.Input(shape=image_shape)
                model = keras.Model(image, classifier(augmentation(params.seed)(image)))
                train, validation, test = photos["train"], photos["validation"], photos["test"]
            else:
                model = build_finetune_model(top, head)
                train, validation, test = splits["train"], splits["validation"], splits["test"]
            model.compile(optimizer=make_optimizer(p.optimizer, p.learning_rate),
                          loss=loss_for(len(class_names)), metrics=["accuracy"])
        result = fit(model, train, validation, p.epochs, p.batch_size * replicas, p.early_stopping_patience,
                     params.train.tf_data, params.seed)
        test_metrics = model.evaluate(*test, batch_size=64, verbose=0)
        figures = vgg_figures(classifier, photos["test"][0][0], ("block5_conv1", "block5_conv3"))
        publish_training(run, model, classifier, result, tuple(test_metrics), (MODEL, METRICS, PLOTS),
                         figures, photos["test"][0][:2])
