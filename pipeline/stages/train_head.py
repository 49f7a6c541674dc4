"""train_head: a new dense classifier on VGG16's cached block5_pool features.

Writes models/head.keras (the complete classifier: raw photos in, class probabilities out),
metrics/head.json and plots/head/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.params import load_params
from pipeline.stages.common import fit, publish_training, start_training
from pipeline.stages.vgg_common import FEATURES, IMAGES, WEIGHTS, load_features, loss_for, vgg_figures

STAGE = "train_head"
MODEL = Path("models/head.keras")
METRICS = Path("metrics/head.json")
PLOTS = Path("plots/head")


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    from pipeline.models.optimizer import make_optimizer
    from pipeline.models.vgg import assemble_classifier, build_conv_base, build_head
    from pipeline.tracking import stage_run

    p = params.head
    scope, replicas = start_training(params, (FEATURES, "extract_features"), (WEIGHTS, "download_weights"))
    splits, class_names = load_features("pooled")
    with np.load(IMAGES) as data:
        examples = data["x_test"][:2]
    photo = examples[0]
    stage_params = {"seed": params.seed, "head": p.model_dump(), "train": params.train.model_dump()}
    with stage_run(STAGE, stage_params, [FEATURES, WEIGHTS], params.mlflow.experiment) as run:
        with scope:
            head = build_head(splits["train"][0].shape[1:], len(class_names), p.pooling, p.units, p.dropout)
            head.compile(optimizer=make_optimizer(p.optimizer, p.learning_rate),
                         loss=loss_for(len(class_names)), metrics=["accuracy"])
        result = fit(head, splits["train"], splits["validation"], p.epochs, p.batch_size * replicas,
                     p.early_stopping_patience, params.train.tf_data, params.seed)
        test = head.evaluate(*splits["test"], batch_size=256, verbose=0)
        conv_base = build_conv_base(str(WEIGHTS), photo.shape)
        classifier = assemble_classifier(conv_base, head, unfreeze=0)
        figures = vgg_figures(classifier, photo, ("block1_conv1", "block3_conv3", "block5_conv3"))
        publish_training(run, head, classifier, result, tuple(test), (MODEL, METRICS, PLOTS), figures,
                         examples)
