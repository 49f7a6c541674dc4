"""evaluate: scores against hand-computed numbers, shared-layer inference, the stage's outputs."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, assert_float32_close
from pipeline.evaluation import (
    class_probabilities,
    cross_entropy,
    mcnemar_exact,
    paired_test,
    per_class_metrics,
    pick_examples,
    score,
    wilson_interval,
)

# 3 classes, 10 samples. Confusion (rows actual, columns predicted):
#   a: [2, 1, 0]    b: [1, 3, 0]    c: [0, 1, 2]
ACTUAL = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
PREDICTED = np.array([0, 0, 1, 0, 1, 1, 1, 1, 2, 2])


def test_scores_match_the_hand_computed_confusion():
    outputs = np.eye(3)[PREDICTED]  # one-hot "probabilities": argmax is PREDICTED
    scores = score(ACTUAL, outputs, ["a", "b", "c"])
    assert set(scores) == {"test_accuracy", "test_accuracy_ci95", "test_loss", "test_samples"}
    assert scores["test_samples"] == 10
    assert scores["test_accuracy"] == pytest.approx(7 / 10)
    assert scores["test_accuracy_ci95"] == pytest.approx(list(wilson_interval(7, 10)))


def test_per_class_metrics_match_the_hand_computed_confusion():
    per_class = per_class_metrics(ACTUAL, PREDICTED, ["a", "b", "c"])
    # precision = diagonal / column sum, recall = diagonal / row sum.
    assert per_class["a"]["precision"] == pytest.approx(2 / 3)
    assert per_class["a"]["recall"] == pytest.approx(2 / 3)
    assert per_class["b"]["precision"] == pytest.approx(3 / 5)
    assert per_class["b"]["recall"] == pytest.approx(3 / 4)
    assert per_class["c"]["precision"] == pytest.approx(2 / 2)
    assert per_class["c"]["recall"] == pytest.approx(2 / 3)
    assert per_class["b"]["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert [per_class[name]["support"] for name in "abc"] == [3, 4, 3]


def test_a_class_never_predicted_scores_zero_not_nan():
    per_class = per_class_metrics(np.array([0, 1, 1]), np.array([1, 1, 1]), ["never", "always"])
    assert per_class["never"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    json.dumps(per_class, allow_nan=False)


def test_wilson_interval_against_the_formula_worked_by_hand():
    # 81 of 263 at 95% (z = 1.959964, z^2/n = 0.0146063): centre (0.307985 + 0.0073031) /
    # 1.0146063 = 0.310749; half-width z / 1.0146063 * sqrt(0.307985 * 0.692015 / 263 +
    # 0.0146063 / (4 * 263)) = 0.055461; so (0.255288, 0.366210).
    assert wilson_interval(81, 263) == pytest.approx((0.255288, 0.366210), abs=2e-6)
    # None right of 10: low 0, high z^2/n / (1 + z^2/n) = 0.384146 / 1.384146 = 0.277533.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=2e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=2e-6)  # the mirror image
    # 90% (z = 1.644854, z^2/n = 0.0270554) narrows it: 50 of 100 gives 0.5 +- 1.601525 *
    # sqrt(0.0025 + 0.0000676) = 0.5 +- 0.081152.
    assert wilson_interval(50, 100, confidence=0.90) == pytest.approx((0.418848, 0.581152), abs=2e-6)


@pytest.mark.parametrize("correct, total", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_interval_refuses_what_is_not_a_proportion(correct, total):
    with pytest.raises(ValueError, match="proportion"):
        wilson_interval(correct, total)


@pytest.mark.parametrize(
    "only_a, only_b, expected",
    [
        (0, 0, 1.0),  # nothing discordant: no evidence either way
        (3, 3, 1.0),  # an even split; 2 * P(X <= 3 | n = 6) = 2 * 42/64 > 1, capped
        (1, 9, 0.021484375),  # 2 * (1 + 10) / 2^10 = 22/1024
        (9, 1, 0.021484375),  # two-sided: symmetric
        (0, 5, 0.0625),  # 2 * 1/32
        (2, 10, 158 / 4096),  # 2 * (1 + 12 + 66) / 4096 = 158/4096
    ],
)
def test_mcnemar_exact_against_the_binomial_by_hand(only_a, only_b, expected):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_exact_agrees_with_scipys_binomial_test():
    from scipy.stats import binomtest

    for only_a, only_b in ((4, 17), (30, 45), (600, 640), (7, 0)):
        assert mcnemar_exact(only_a, only_b) == pytest.approx(binomtest(only_a, only_a + only_b).pvalue, rel=1e-9)


def test_paired_test_counts_the_discordant_samples():
    a = np.array([1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 1, 1, 1, 1], bool)  # a alone right once, b alone right 3 times
    assert paired_test("a", a, "b", b) == {"p_value": 0.625, "only_a_right": 1, "only_b_right": 3}  # 2 * 5/16
    with pytest.raises(ValueError, match="same samples"):
        paired_test("a", a, "b", b[:5])


def test_one_hot_labels_and_sigmoid_outputs():
    scores = score(np.eye(2)[[0, 1, 1]], np.array([[0.2], [0.9], [0.4]]), ["cat", "dog"])
    assert scores["test_accuracy"] == pytest.approx(2 / 3)
    assert scores["test_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.9, 0.4])))


def test_loss_equals_keras_evaluate_even_when_the_sigmoid_saturates():
    import keras

    from pipeline.models.inference import logit_model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
    model.layers[-1].set_weights([np.array([[30.0], [-1.0]], np.float32), np.zeros(1, np.float32)])
    model.compile(loss="binary_crossentropy")
    x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], np.float32)  # logits 30, -1, 60
    y = np.array([0, 0, 1])
    expected = model.evaluate(x, y, verbose=0)
    assert model.predict(x, verbose=0)[0, 0] == 1.0  # saturated: probabilities lose the loss
    logits, from_logits = logit_model(model)
    assert from_logits
    outputs = logits.predict(x, verbose=0)
    assert cross_entropy(y, outputs, from_logits=True) == pytest.approx(expected, rel=1e-5)
    assert class_probabilities(outputs, from_logits=True)[:, 1] == pytest.approx([1.0, 0.2689414, 1.0])


def test_softmax_logits_loss():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    expected = -np.mean(np.log([np.exp(2) / (np.exp(2) + 1 + np.exp(-1)), 1 / 3]))
    assert cross_entropy(np.array([0, 2]), logits, from_logits=True) == pytest.approx(expected)


def test_pick_examples_takes_up_to_half_misclassified_first():
    picked = pick_examples(ACTUAL, PREDICTED, 4)
    assert list(picked) == [2, 3, 0, 1]  # mistakes 2 and 3 first, then the first correct ones
    assert len(pick_examples(ACTUAL, ACTUAL, 4)) == 4  # no mistakes: all correct
    assert list(pick_examples(ACTUAL, PREDICTED, 50)) == [2, 3, 7, 0, 1, 4, 5, 6, 8, 9]


def test_predict_together_shares_layers_and_matches_predict(tmp_path):
    import keras

    from pipeline.models.inference import predict_together, sharing_groups, split_models
    from tiny_project import scratch_like, vgg_like

    first, second = vgg_like(seed=1), vgg_like(seed=1)
    second.get_layer("block2_conv2").set_weights([w + 0.1 for w in second.get_layer("block2_conv2").get_weights()])
    first.save(tmp_path / "a.keras")
    second.save(tmp_path / "b.keras")
    loaded = [keras.models.load_model(tmp_path / name) for name in ("a.keras", "b.keras")]
    shared, tops = split_models(loaded)
    assert shared.layers[-1].name == "block2_conv1"  # the last layer both have unchanged
    assert [layer.name for layer in tops[0].layers[1:3]] == ["block2_conv2", "block2_pool"]
    photos = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    together = predict_together(loaded, photos, batch_size=3)
    for model, outputs in zip(loaded, together):
        # a shared trunk and batches of 3 against the whole model in one batch (conftest)
        assert_float32_close(outputs, model.predict(photos, verbose=0))
    # A model that shares nothing (the convnet from scratch) runs apart; the two still share.
    models = [loaded[0], scratch_like(), loaded[1]]
    assert sharing_groups(models) == [[0, 2], [1]]
    for model, outputs in zip(models, predict_together(models, photos, batch_size=3)):
        assert_float32_close(outputs, model.predict(photos, verbose=0))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny project on which the evaluate stage has run (MLflow in a temp sqlite store)."""
    from pipeline.stages import evaluate
    from tiny_project import run_stages_in_tiny_project

    return run_stages_in_tiny_project(tmp_path_factory.mktemp("evaluate"), evaluate)


def test_evaluate_writes_the_contract(evaluated):
    from tiny_project import MNIST_TEST, PHOTOS_PER_CLASS

    metrics = json.loads((evaluated / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"baseline", "dense", "feature_extraction", "fine_tuning", "scratch", "dense_vs_baseline",
                            "fine_tuning_vs_feature_extraction", "scratch_vs_feature_extraction",
                            "scratch_vs_fine_tuning", "translation", "raw_check"}
    checked = metrics["raw_check"]  # evaluate.raw_sample: 4 of the 12 test photos, through the whole models
    assert checked["photos"] == 4 and set(checked["max_relative_difference"]) == {"feature_extraction", "fine_tuning"}
    assert all(0.0 <= value <= 1e-5 for value in checked["max_relative_difference"].values())
    for name, samples in (("baseline", MNIST_TEST), ("fine_tuning", 2 * PHOTOS_PER_CLASS["test"])):
        assert set(metrics[name]) == {
            "test_accuracy", "test_accuracy_ci95", "test_loss", "test_samples", "mlflow_run_id"}  # no per-class block
        assert metrics[name]["test_samples"] == samples
        assert 0.0 <= metrics[name]["test_accuracy"] <= 1.0 and metrics[name]["test_loss"] > 0
        low, high = metrics[name]["test_accuracy_ci95"]
        assert 0.0 <= low <= metrics[name]["test_accuracy"] <= high <= 1.0
    plots = sorted(p.name for p in (evaluated / "plots/evaluate").iterdir())
    for name in ("baseline", "dense", "feature_extraction", "fine_tuning", "scratch"):
        assert {f"confusion_{name}.csv", f"confusion_{name}.png", f"misclassified_{name}.png"} <= set(plots)
    assert {"gradcam_fine_tuning.png", "per_class.csv", "correct_mnist.csv", "correct_images.csv",
            "translation.csv", "translation.png"} <= set(plots)


def test_per_class_csv_has_every_class_of_every_model(evaluated):
    frame = pd.read_csv(evaluated / "plots/evaluate/per_class.csv", dtype={"class": str})
    assert list(frame.columns) == ["model", "class", "precision", "recall", "f1", "support"]
    assert list(frame[frame["model"] == "baseline"]["class"]) == [str(i) for i in range(10)]
    assert list(frame[frame["model"] == "fine_tuning"]["class"]) == ["cat", "dog"]
    metrics = json.loads((evaluated / "metrics/evaluate.json").read_text())
    for model, rows in frame.groupby("model"):
        assert rows["support"].sum() == metrics[model]["test_samples"]


def test_correct_csv_and_the_paired_test_agree_with_the_metrics(evaluated):
    metrics = json.loads((evaluated / "metrics/evaluate.json").read_text())
    digits = pd.read_csv(evaluated / "plots/evaluate/correct_mnist.csv")
    photos = pd.read_csv(evaluated / "plots/evaluate/correct_images.csv")
    assert list(digits.columns) == ["sample", "baseline", "dense"]
    assert list(photos.columns) == ["sample", "feature_extraction", "fine_tuning", "scratch"]
    for frame, model in ((digits, "baseline"), (photos, "feature_extraction"), (photos, "fine_tuning"),
                         (photos, "scratch")):
        assert len(frame) == metrics[model]["test_samples"] and set(frame[model]) <= {0, 1}
        assert frame[model].mean() == pytest.approx(metrics[model]["test_accuracy"])
    paired = metrics["fine_tuning_vs_feature_extraction"]
    only_fine, only_features = paired["only_fine_tuning_right"], paired["only_feature_extraction_right"]
    assert only_fine == int(((photos["fine_tuning"] == 1) & (photos["feature_extraction"] == 0)).sum())
    assert only_features == int(((photos["fine_tuning"] == 0) & (photos["feature_extraction"] == 1)).sum())
    assert paired["p_value"] == mcnemar_exact(only_fine, only_features)
    # What pretraining buys: the convnet from scratch paired with feature extraction the same way
    scratch = metrics["scratch_vs_feature_extraction"]
    only_scratch, only_head = scratch["only_scratch_right"], scratch["only_feature_extraction_right"]
    assert only_scratch == int(((photos["scratch"] == 1) & (photos["feature_extraction"] == 0)).sum())
    assert only_head == int(((photos["scratch"] == 0) & (photos["feature_extraction"] == 1)).sum())
    assert scratch["p_value"] == mcnemar_exact(only_scratch, only_head)


def test_confusion_csv_agrees_with_the_metrics(evaluated):
    metrics = json.loads((evaluated / "metrics/evaluate.json").read_text())["fine_tuning"]
    per_class = pd.read_csv(evaluated / "plots/evaluate/per_class.csv").set_index(["model", "class"])
    frame = pd.read_csv(evaluated / "plots/evaluate/confusion_fine_tuning.csv")
    assert list(frame.columns) == ["actual", "predicted"]
    assert set(frame["actual"]) == {"cat", "dog"} and len(frame) == metrics["test_samples"]
    assert (frame["actual"] == frame["predicted"]).mean() == pytest.approx(metrics["test_accuracy"])
    dog = frame[frame["predicted"] == "dog"]
    if len(dog):
        assert (dog["actual"] == "dog").mean() == pytest.approx(per_class.loc[("fine_tuning", "dog"), "precision"])


def test_evaluate_is_its_own_mlflow_run(evaluated):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{evaluated / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'evaluate'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = json.loads((evaluated / "metrics/evaluate.json").read_text())
    assert metrics["baseline"]["mlflow_run_id"] == runs[0].info.run_id
    logged = runs[0].data.metrics
    assert logged["fine_tuning.test_accuracy"] == metrics["fine_tuning"]["test_accuracy"]
    assert [logged[f"baseline.test_accuracy_ci95_{end}"] for end in ("low", "high")] == metrics["baseline"][
        "test_accuracy_ci95"]
    assert logged["fine_tuning_vs_feature_extraction.p_value"] == metrics["fine_tuning_vs_feature_extraction"][
        "p_value"]
    assert "fine_tuning.recall.dog" in logged  # the per-class table is still in MLflow
    assert runs[0].data.params["evaluate.gradcam.layer"] == "block2_conv2"
    assert "inference_seconds.images" in runs[0].data.metrics
    assert logged["raw_check.photos"] == 4 and "raw_check.fine_tuning.max_relative_difference" in logged
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "plots")}
    assert "plots/gradcam_fine_tuning.png" in artifacts


def test_the_translation_curve_starts_at_the_test_accuracy_and_ends_at_the_headline(evaluated):
    metrics = json.loads((evaluated / "metrics/evaluate.json").read_text())
    curve = pd.read_csv(evaluated / "plots/evaluate/translation.csv")
    headline = metrics["translation"]
    assert headline["max_shift"] == 2 and set(curve["model"]) == {"baseline", "dense"}
    assert set(curve["direction"]) == {"none", "right", "left", "down", "up", "all"}
    pooled = curve[curve["direction"] == "all"].set_index(["model", "pixels"])
    for model in ("baseline", "dense"):
        assert pooled.loc[(model, 0), "accuracy"] == pytest.approx(metrics[model]["test_accuracy"])
        assert pooled.loc[(model, 1), "samples"] == 4 * metrics[model]["test_samples"]  # four directions
        end = pooled.loc[(model, 2)]
        assert headline[model] == {"accuracy": pytest.approx(end["accuracy"]),
                                   "accuracy_ci95": [pytest.approx(end["ci95_low"]), pytest.approx(end["ci95_high"])]}
    each = curve[curve["direction"] == "right"]
    assert (each["correct"] / each["samples"]).tolist() == pytest.approx(each["accuracy"].tolist())


def test_a_shift_range_larger_than_the_digits_is_a_user_error(evaluated, monkeypatch):
    from ruamel.yaml import YAML

    from pipeline.errors import UserError
    from pipeline.stages import evaluate

    params = YAML(typ="safe", pure=True).load((evaluated / "params.yaml").read_text())
    params["evaluate"]["translation"]["max_shift"] = 28
    monkeypatch.chdir(evaluated)
    bad = evaluated / "bad_shift.yaml"
    YAML().dump(params, bad)
    before = (evaluated / "metrics/evaluate.json").read_text()
    with pytest.raises(UserError, match=r"^evaluate.translation.max_shift: 28 pixels .* choose at most 27$"):
        evaluate.run(bad)
    assert (evaluated / "metrics/evaluate.json").read_text() == before


def test_a_gradcam_layer_that_is_not_a_conv_layer_is_a_user_error(evaluated, monkeypatch):
    from ruamel.yaml import YAML

    from pipeline.errors import UserError
    from pipeline.stages import evaluate

    params = YAML(typ="safe", pure=True).load((evaluated / "params.yaml").read_text())
    params["evaluate"]["gradcam"]["layer"] = "head_dense"
    monkeypatch.chdir(evaluated)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{evaluated / 'mlflow.db'}")
    bad = evaluated / "bad_params.yaml"
    YAML().dump(params, bad)
    before = (evaluated / "metrics/evaluate.json").read_text()
    with pytest.raises(UserError, match="evaluate.gradcam.layer"):
        evaluate.run(bad)
    assert (evaluated / "metrics/evaluate.json").read_text() == before  # outputs untouched


def test_the_vgg16_models_scored_from_the_cache_equal_their_whole_models(evaluated, monkeypatch):
    """predict_all's outputs of the two VGG-like models (their tops on data/features/, written
    by sub-models of the saved head: tiny_project) against each saved model on the raw photos."""
    import keras

    from pipeline.stages import evaluate

    monkeypatch.chdir(evaluated)
    test_sets = evaluate.load_test_sets()
    models = {name: keras.models.load_model(trained.model) for name, trained in evaluate.MODELS.items()}
    outputs, _ = evaluate.predict_all(models, test_sets, dict.fromkeys(test_sets, 4), unfreeze=1)
    photos = test_sets[evaluate.IMAGES].images
    for name in ("feature_extraction", "fine_tuning"):
        result, from_logits = outputs[name]
        probabilities = class_probabilities(result, from_logits)[:, 1:]
        # the cache against a forward pass: two computations (conftest)
        assert_float32_close(probabilities, models[name].predict(photos, batch_size=12, verbose=0), err_msg=name)
    assert not np.allclose(outputs["feature_extraction"][0], outputs["fine_tuning"][0])  # each read its own cache


def test_a_corrupted_cache_fails_the_stage_in_one_line_and_writes_nothing(evaluated, monkeypatch):
    from ruamel.yaml import YAML

    from pipeline.errors import UserError
    from pipeline.stages import evaluate

    monkeypatch.chdir(evaluated)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{evaluated / 'mlflow.db'}")
    cache = evaluated / "data/features/test_frozen.npy"
    original = np.load(cache)
    outputs = [evaluated / "metrics/evaluate.json", *sorted((evaluated / "plots/evaluate").iterdir())]
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in outputs}
    noise = np.random.default_rng(0).normal(0, 0.01 * np.abs(original).max(), original.shape)
    np.save(cache, (original + noise).astype(np.float32))
    try:
        with pytest.raises(UserError) as caught:
            evaluate.run(evaluated / "params.yaml")
    finally:
        np.save(cache, original)
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(r"^fine_tuning: models/finetuned.keras on 4 raw test photos differs .* by [0-9.e+-]+ relative, "
                    r"above evaluate.raw_rtol 1e-05", message), message
    assert [evaluated / "metrics/evaluate.json", *sorted((evaluated / "plots/evaluate").iterdir())] == outputs
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in outputs} == before  # nothing written


def test_raw_sample_zero_runs_no_photo_and_compares_nothing():
    from pipeline.params import load_params
    from pipeline.stages import evaluate
    from tiny_project import CLASS_NAMES

    p = load_params(REPO / "params.yaml").evaluate.model_copy(update={"raw_sample": 0})
    photos = evaluate.LabelledImages(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]), CLASS_NAMES)
    # no model to run, outputs that would differ by everything: nothing is run or compared
    checked, seconds = evaluate.check_raw_sample({}, {}, photos, p, seed=0)
    assert checked == {"photos": 0, "max_relative_difference": {}} and seconds == 0.0


def test_the_raw_sample_is_seeded_and_takes_every_class_in_turn():
    from pipeline.evaluation import stratified_sample

    labels = np.array([0] * 20 + [1] * 3 + [2] * 7)
    sample = stratified_sample(labels, 6, seed=1)
    assert list(sample) == sorted(set(sample)) and len(sample) == 6
    assert sorted(np.bincount(labels[sample], minlength=3)) == [2, 2, 2]  # each class in turn
    assert list(stratified_sample(labels, 6, seed=1)) == list(sample)
    assert list(stratified_sample(labels, 6, seed=2)) != list(sample)
    assert np.bincount(labels[stratified_sample(labels, 12, seed=1)]).tolist() == [5, 3, 4]  # class 1 runs out
    assert list(stratified_sample(labels, 100, seed=1)) == list(range(30))
    assert len(stratified_sample(labels, 0, seed=1)) == 0


def test_max_relative_difference_is_relative_to_the_largest_output():
    from pipeline.evaluation import max_relative_difference

    desired = np.array([[10.0], [-0.001], [4.0]])
    assert max_relative_difference(desired + [[0.0], [0.0001], [0.0]], desired) == pytest.approx(1e-5)
    assert max_relative_difference(desired, desired) == 0.0
    assert max_relative_difference(np.ones(2), np.zeros(2)) == float("inf")
    with pytest.raises(ValueError, match="shapes"):
        max_relative_difference(np.ones(2), np.ones(3))


def test_an_evaluate_run_logs_its_test_data_hash_so_compare_can_pair_it(evaluated, monkeypatch):
    import mlflow

    from pipeline.compare import compare_paired

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{evaluated / 'mlflow.db'}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{evaluated / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    run = client.search_runs([experiment.experiment_id],
                             "tags.`pipeline.stage` = 'evaluate' and attributes.status = 'FINISHED'")[0]
    assert {key for key in run.data.tags if key.startswith("test_data.")} == {
        "test_data.mnist.sha256", "test_data.images.sha256"}
    lines = compare_paired("tiny", run.info.run_id, run.info.run_id[:8]).splitlines()
    assert [line.split(" on the ")[0] for line in lines] == ["feature_extraction", "fine_tuning", "scratch", "baseline", "dense"]
    assert all(line.endswith("exact McNemar p = 1") for line in lines)  # a run against itself


def test_the_first_evaluate_registers_every_model_and_says_so(evaluated):
    """The first version of each name is its champion; the fine-tuned model, the second
    version of cats-vs-dogs, is champion only if better with p < 0.05 against the first."""
    import mlflow

    from pipeline.files import sha256_arrays

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{evaluated / 'mlflow.db'}")
    registry = json.loads((evaluated / "plots/evaluate/registry.json").read_text())
    assert {key: (r["name"], r["version"], r["new"]) for key, r in registry.items()} == {
        "baseline": ("mnist-convnet", "1", True),
        "dense": ("mnist-dense", "1", True),
        "scratch": ("cats-vs-dogs-scratch", "1", True),
        "feature_extraction": ("cats-vs-dogs", "1", True),
        "fine_tuning": ("cats-vs-dogs", "2", True),
    }
    assert registry["baseline"]["alias"] == registry["feature_extraction"]["alias"] == "champion"
    fine = registry["fine_tuning"]
    promoted = fine["only_new_right"] > fine["only_champion_right"] and fine["p_value"] < 0.05
    assert fine["alias"] == ("champion" if promoted else "challenger") and fine["champion_before"] == "1"
    paired = json.loads((evaluated / "metrics/evaluate.json").read_text())["fine_tuning_vs_feature_extraction"]
    assert fine["p_value"] == paired["p_value"]  # the same test on the same samples
    assert str(client.get_model_version_by_alias("cats-vs-dogs", fine["alias"]).version) == "2"

    version = client.get_model_version("cats-vs-dogs", "1")
    assert json.loads(version.tags["class_names"]) == ["cat", "dog"]
    with np.load(evaluated / "data/prepared/images.npz") as data:
        assert version.tags["test_data.sha256"] == sha256_arrays(data["x_test"], data["y_test"])
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],  # not a failed one of a test
                             "tags.`pipeline.stage` = 'evaluate' and attributes.status = 'FINISHED'")[0]
    assert version.tags["evaluate.run_id"] == run.info.run_id
    assert run.data.tags["registry.fine_tuning"].startswith(f"fine_tuning: cats-vs-dogs version 2, {fine['alias']}")
    inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    assert inputs == {("mnist.test", mock_digest(evaluated / "data/prepared/mnist.npz")),
                      ("images.test", version.tags["test_data.sha256"][:36])}
    assert client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "custom_model_development"


def mock_digest(path) -> str:
    from pipeline.files import sha256_arrays

    with np.load(path) as data:
        return sha256_arrays(data["x_test"], data["y_test"])[:36]


def test_a_worse_model_is_the_challenger_and_a_significantly_better_one_the_champion(workdir, monkeypatch):
    """register_all in a store of its own: first -> champion; worse -> challenger, champion
    unchanged; better but p >= significance -> challenger; better and p < significance ->
    champion; the same model file again -> nothing new."""
    import mlflow
    import pandas as pd

    from pipeline.params import RegistryParams
    import keras

    from pipeline.registry import Scored, register_all

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("registry")
    (workdir / "models").mkdir()
    (workdir / "metrics").mkdir()
    (workdir / "metrics/finetune.json").write_text(json.dumps({"mlflow_run_id": None}))  # no training run
    params = RegistryParams(names={"fine_tuning": "cats"}, significance=0.05)
    images = np.zeros((1, 2), np.float32)
    half = np.array([1, 0] * 6, bool)  # 6 of 12 right

    def evaluate(seed: int, correct: np.ndarray, save: bool = True):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
        if save:  # a saved model records when it was saved: each file is new
            model.save(workdir / "models/finetuned.keras")
        with mlflow.start_run() as run:
            plots = workdir / "plots"
            plots.mkdir(exist_ok=True)
            pd.DataFrame({"sample": range(12), "fine_tuning": correct.astype(int)}).to_csv(
                plots / "correct_images.csv", index=False)
            mlflow.log_artifacts(str(plots), "plots")
            scored = Scored("fine_tuning", model, correct, "a" * 64, ["cat", "dog"], float(correct.mean()), images)
            return register_all({"fine_tuning": scored}, params, run.info.run_id)["fine_tuning"]

    client = mlflow.MlflowClient()
    first = evaluate(1, half)
    assert (first.version, first.alias, first.new) == ("1", "champion", True)
    worse = half.copy()
    worse[0] = False  # one sample fewer right than the champion
    second = evaluate(2, worse)
    assert (second.version, second.alias) == ("2", "challenger") and "not better" in second.reason
    assert (second.only_new_right, second.only_champion_right, second.p_value) == (0, 1, 1.0)
    slightly = half.copy()
    slightly[1] = True  # one more right: better, p = 1.0
    third = evaluate(3, slightly)
    assert (third.version, third.alias) == ("3", "challenger") and "not significantly" in third.reason
    assert str(client.get_model_version_by_alias("cats", "champion").version) == "1"
    everything = np.ones(12, bool)  # 6 more right, none fewer: p = 2 / 2**6 = 0.03125
    fourth = evaluate(4, everything)
    assert (fourth.version, fourth.alias, fourth.p_value) == ("4", "champion", 0.03125)
    assert str(client.get_model_version_by_alias("cats", "champion").version) == "4"
    assert str(client.get_model_version_by_alias("cats", "challenger").version) == "3"
    again = evaluate(4, everything, save=False)  # the same model file (evaluate run again): no new version
    assert (again.version, again.alias, again.new) == ("4", "champion", False)
    assert len(client.search_model_versions("name = 'cats'")) == 4
    source = client.get_model_version("cats", "1").source
    assert source.startswith("models:/"), "a logged model (logged here: the training run logged none)"


def test_the_champion_is_served_by_mlflow_and_answers_a_real_photo(evaluated, tmp_path):
    """`mlflow models serve -m models:/cats-vs-dogs@champion --env-manager local` on loopback
    answers a JPEG's pixels posted to /invocations with an ordinary HTTP client: the champion's
    probabilities, as Keras computes them from the model file it was registered from."""
    import io
    import signal
    import subprocess

    import keras
    import requests
    from PIL import Image

    from conftest import BIN, command_env, free_port, wait_for
    from pipeline.data.inputs import photo_input

    registry = json.loads((evaluated / "plots/evaluate/registry.json").read_text())
    champion = next(key for key in ("feature_extraction", "fine_tuning") if registry[key]["alias"] == "champion")
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/cats-vs-dogs@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=evaluated, env=command_env(f"sqlite:///{evaluated / 'mlflow.db'}"), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)

    def answers() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        try:
            wait_for(answers, "the model server to answer /ping", timeout=240, process=server, log=log)
        except AssertionError as exc:
            if any(reason in str(exc) for reason in ("Address already in use", "Permission denied")):
                pytest.skip(f"the model server cannot start here: {str(exc)[-300:]}")
            raise
        rng = np.random.default_rng(3)
        pixels = rng.integers(0, 90, (48, 64, 3), dtype=np.uint8)
        pixels[..., 2] += 150  # a bluish 'dog', as in write_photo_zip
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        photo = photo_input(buffer.getvalue(), ".jpg", 32, 32)[np.newaxis]
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": photo.tolist()}, timeout=60)
        assert response.status_code == 200, response.text
        served = np.asarray(response.json()["predictions"], dtype=np.float32)
        import pipeline.models.vgg  # noqa: F401

        expected = keras.models.load_model(evaluated / catalog_model(champion)).predict(photo, verbose=0)
        assert served.shape == expected.shape == (1, 1)
        assert_float32_close(served, expected)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def catalog_model(key: str):
    from pipeline.catalog import MODELS

    return MODELS[key].model


def test_predict_with_a_registered_model_and_unknown_names_or_aliases(evaluated, monkeypatch, tmp_path):
    """`pipeline predict --model models:/cats-vs-dogs@champion`: the registered version, with
    the class names it was scored with; an unknown name or alias is one line listing what is."""
    from PIL import Image

    from pipeline.errors import UserError
    from pipeline.params import PredictParams
    from pipeline.predict import predict

    monkeypatch.chdir(evaluated)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{evaluated / 'mlflow.db'}")
    with np.load(evaluated / "data/prepared/images.npz") as data:
        Image.fromarray(data["x_test"][0]).save(tmp_path / "photo.png")
    p = PredictParams(batch_size=4, digit_box=20)
    out, _ = predict([tmp_path / "photo.png"], "models:/cats-vs-dogs@champion", "json", p)
    (record,) = json.loads(out)
    assert record["class"] in ("cat", "dog") and record["error"] is None
    for reference in ("models:/cats-vs-dogs@best", "models:/no-such-model@champion", "models:/cats-vs-dogs/9"):
        with pytest.raises(UserError, match="not in the model registry") as caught:
            predict([tmp_path / "photo.png"], reference, "table", p)
        message = str(caught.value)
        assert "registered: cats-vs-dogs (" in message and "champion -> 1" in message and "\n" not in message


def test_registry_names_must_name_every_scored_model():
    from pipeline.errors import UserError
    from pipeline.params import RegistryParams
    from pipeline.registry import check_names

    with pytest.raises(UserError, match="evaluate.registry.names: needs a name for each of baseline, .*missing"):
        check_names(RegistryParams(names={"baseline": "mnist-convnet"}, significance=0.05))
    check_names(RegistryParams(names={key: "m" for key in ("baseline", "dense", "feature_extraction", "fine_tuning",
                                                            "scratch")},
                               significance=0.05))
