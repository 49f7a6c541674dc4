"""The optimizers of every training stage, by their params name, with an optional schedule.

Apart from the models so that editing one model (the MNIST convnet, say) does not make DVC
re-run the stages that train another (dvc.yaml lists this file for all three).
"""

from __future__ import annotations

import keras


def make_optimizer(
    name: str, learning_rate: float, schedule: str = "constant", total_steps: int = 0
) -> keras.optimizers.Optimizer:
    """A Keras optimizer by its params name ("rmsprop", "adam", "sgd").

    `schedule: cosine` decays the rate to 0 over `total_steps` (all batches of all epochs).
    """
    classes = {
        "rmsprop": keras.optimizers.RMSprop,
        "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
    }
    rate = learning_rate
    if schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(total_steps, 1))
    return classes[name](learning_rate=rate)
