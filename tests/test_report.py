"""The report: Markdown and self-contained HTML, the report stage on a tiny project, and the
HTML opened in a real headless Chromium (skipped when there is none)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from xml.etree import ElementTree

import pandas as pd
import pytest

from pipeline.reporting.render import Picture, Preformatted, Report, Section, Table, Text, to_html, to_markdown

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=10000",
]
# Appended to a copy of the page: once everything has loaded, write what the browser saw
# (every picture decoded? the results table there?) into the DOM, which --dump-dom prints.
CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const results = document.querySelector("table#results");
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({
    images: images.length,
    widths: images.map((image) => image.naturalWidth),
    results_rows: results ? results.tBodies[0].rows.length : -1,
    results_headers: results ? Array.from(results.tHead.rows[0].cells).map((c) => c.textContent) : [],
  });
  document.body.appendChild(out);
});
</script>
"""


def png(width: float = 1.0, height: float = 0.6) -> bytes:
    from pipeline.viz.common import figure_to_png_bytes, new_figure

    figure = new_figure(width, height)
    figure.subplots().plot([0, 1], [1, 0])
    return figure_to_png_bytes(figure, dpi=40)


def small_report() -> Report:
    results = pd.DataFrame({"model": ["a <b>", "c"], "test accuracy": [0.5, 0.75]})
    return Report("Title & co", "Intro.", [
        Section("Results", [Text("Plain <text> & more."), Table(results, name="results")]),
        Section("Pictures", [Picture("one.png", png(), "first picture"), Picture("two.png", png(), "second")]),
        Section("Models", [Preformatted("Layer (type)   Output Shape\nconv1 (Conv2D)  (None, 26, 26, 4)", "summary")]),
    ])


def test_markdown_links_figures_and_holds_the_table():
    text = to_markdown(small_report())
    assert text.startswith("# Title & co\n")
    assert "![first picture](figures/one.png)" in text and "figures/two.png" in text
    assert "| model" in text and "| a <b>" in text
    assert "```text\nLayer (type)" in text
    assert "- [Results](#results)\n- [Pictures](#pictures)" in text


def test_html_is_self_contained_and_escaped():
    page = to_html(small_report())
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 2 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    assert "<style>" in page and '<table id="results"' in page
    assert "Plain &lt;text&gt; &amp; more." in page and "a &lt;b&gt;" in page


def test_best_runs_table_names_the_params_that_differ():
    from pipeline.reporting.runs import best_runs_table, timings_table

    start = pd.Timestamp("2026-01-01", tz="UTC")
    runs = pd.DataFrame({
        "run_id": ["a" * 32, "b" * 32, "c" * 32],
        "status": ["FINISHED", "FINISHED", "FAILED"],
        "start_time": [start, start + pd.Timedelta(minutes=5), start + pd.Timedelta(minutes=9)],
        "end_time": [start + pd.Timedelta(seconds=30), start + pd.Timedelta(minutes=6), start + pd.Timedelta(minutes=10)],
        "tags.pipeline.stage": ["train_baseline"] * 3,
        "tags.dvc.exp_name": ["old-exp", None, None],
        "metrics.test_accuracy": [0.99, 0.97, None],
        "metrics.process_seconds": [41.26, 400.0, None],
        "metrics.peak_rss_mib": [1843.6, 900.0, None],
        "tags.pipeline.warm": ["true", "false", None],
        "params.baseline.dropout": ["0.25", "0.5", "0.5"],
        "params.seed": ["42", "42", "42"],
    })
    table = best_runs_table(runs, ["train_baseline", "train_head"], {"train_baseline": "b" * 32})
    assert len(table) == 1
    row = table.iloc[0]
    assert row["this run"] == "bbbbbbbb" and row["best run"] == "aaaaaaaa" and row["best test_accuracy"] == 0.99
    assert row["params that differ (this -> best)"] == "baseline.dropout: 0.5 -> 0.25"
    assert row["best run's DVC experiment"] == "old-exp"
    timings = timings_table(runs, ["train_baseline"], {"train_baseline": "a" * 32})
    assert timings.to_dict("records") == [
        {"stage": "train_baseline", "run": "aaaaaaaa", "status": "FINISHED", "started": "2026-01-01 00:00:00", "seconds": 30.0,
         "process seconds": 41.3, "warm": "yes", "peak RSS MiB": 1844.0}
    ]


def model_result(name: str, right: int, samples: int, per_class: dict | None = None):
    from pipeline.reporting.content import ModelResult
    from pipeline.evaluation import wilson_interval

    evaluation = {"test_accuracy": right / samples, "test_accuracy_ci95": list(wilson_interval(right, samples)),
                  "test_loss": 0.5, "test_samples": samples}
    return ModelResult(name, name.replace("_", " "), "test photos", {}, evaluation, per_class or {}, {}, "")


@pytest.mark.parametrize("only_fine, only_features, verdict, plainly", [
    (3, 3, "no measurable difference (p = 1.0, 12 vs 12 errors, 6 discordant)",
     "did not earn its place here: it did not beat feature extraction"),
    (9, 1, "fine-tuning is better (p = 0.021, 4 vs 12 errors, 10 discordant)",  # 2 * 11/1024
     "earned its place here: it beat feature extraction"),
    (1, 9, "fine-tuning is worse (p = 0.021, 20 vs 12 errors, 10 discordant)",
     "did not earn its place here: feature extraction is better"),
])
def test_transfer_sentence_states_the_paired_test_in_words(only_fine, only_features, verdict, plainly):
    from pipeline.evaluation import mcnemar_exact
    from pipeline.reporting.content import transfer_sentence

    features = model_result("feature_extraction", 88, 100)  # 12 errors
    fine = model_result("fine_tuning", 88 + only_fine - only_features, 100)
    paired = {"fine_tuning_vs_feature_extraction": {"p_value": mcnemar_exact(only_fine, only_features),
                                                   "only_fine_tuning_right": only_fine,
                                                   "only_feature_extraction_right": only_features}}
    sentence = transfer_sentence([features, fine], paired)
    assert sentence is not None and f"test photos: {verdict};" in sentence
    assert sentence.endswith(f"So fine-tuning {plainly} on the test photos.")
    assert transfer_sentence([features, fine], {}) is None  # no paired test, no claim


def test_model_sentence_gives_the_interval_and_the_weakest_class():
    from pipeline.reporting.content import model_sentence

    per_class = {"cat": {"precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 50},
                 "dog": {"precision": 0.8, "recall": 0.9, "f1": 0.85, "support": 50}}
    sentence = model_sentence(model_result("fine_tuning", 85, 100, per_class))
    assert "85 of 100 test photos right (85.0%, 95% interval 76.7% to 90.7%;" in sentence  # Wilson 85/100
    assert "Its weakest class is cat (F1 0.847" in sentence


@pytest.mark.parametrize("p_value, shown", [(1.0, "p = 1.0"), (0.021484375, "p = 0.021"), (0.63, "p = 0.63"),
                                             (3e-7, "p < 0.0001")])
def test_p_values_read_plainly(p_value, shown):
    from pipeline.reporting.content import format_p

    assert format_p(p_value) == shown


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A tiny project on which evaluate and then report have run (MLflow in a temp store)."""
    from pipeline.stages import evaluate, report
    from tiny_project import run_stages_in_tiny_project

    return run_stages_in_tiny_project(tmp_path_factory.mktemp("report"), evaluate, report)


def test_report_stage_writes_markdown_html_and_figures(reported):
    reports = reported / "reports"
    markdown = (reports / "report.md").read_text()
    page = (reports / "report.html").read_text()
    linked = re.findall(r"\]\(figures/([^)]+)\)", markdown)
    assert linked and sorted(linked) == sorted(p.name for p in (reports / "figures").iterdir())
    assert page.count("<img ") == len(linked)
    for name in ("curves_baseline.png", "confusion_fine_tuning.png", "gradcam_fine_tuning.png",
                 "classic_baseline.png", "classic_fine_tuning.png", "patterns_baseline.png",
                 "patterns_fine_tuning.png", "activations_fine_tuning_block2_pool.png"):
        assert name in linked
    for heading in ("## Results", "## Training curves", "## What the filters respond to",
                    "## Models: layers and output shapes", "## Data", "## How long each stage took",
                    "## Comparison with earlier runs", "## Translation invariance"):
        assert heading in markdown
    assert "translation.png" in linked
    assert "unshifted test digits" in markdown  # the translation test, stated in words
    assert ("tolerates the shift better: it lost" in markdown) != ("the two intervals overlap" in markdown)
    assert "VGG16 fine-tuned: input 32x32x3 -> block1_conv1 32x32x4 -> block1_pool 16x16x4" in markdown
    assert not any("vgg_preprocess" in name for name in linked)  # preprocessing is not a filter
    assert "skipped cat/666.jpg: not an image" in markdown  # provenance from images_report.json
    assert "baseline.dropout: 0.5 -> 0.25" in markdown  # the earlier, better run differs in dropout
    # what evaluate did in the model registry, in words
    assert "Baseline convnet: version 1 of `mnist-convnet`, registered as `champion`: the first version" in markdown
    assert "VGG16 fine-tuned: version 2 of `cats-vs-dogs`, registered as `c" in markdown


def test_report_results_table_matches_evaluate(reported):
    metrics = json.loads((reported / "metrics/evaluate.json").read_text())
    page = (reported / "reports/report.html").read_text()
    table = ElementTree.fromstring(re.search(r'<table id="results".*?</table>', page, re.S).group(0))
    headers = [cell.text for cell in table.iter("th")]
    rows = [[cell.text for cell in row.iter("td")] for row in table.find("tbody")]
    column = headers.index("test accuracy")
    models = ("baseline", "dense", "feature_extraction", "fine_tuning", "scratch")
    assert [row[0] for row in rows] == ["Baseline convnet", "Dense-only network", "VGG16 feature extraction",
                                        "VGG16 fine-tuned", "Convnet from scratch"]
    expected = [round(metrics[name]["test_accuracy"], 4) for name in models]
    assert [float(row[column]) for row in rows] == pytest.approx(expected)
    shown = [float(end) for row in rows for end in row[headers.index("95% interval")].split(" - ")]
    expected = [end for name in models for end in metrics[name]["test_accuracy_ci95"]]
    assert shown == pytest.approx(expected, abs=5e-5)
    markdown = (reported / "reports/report.md").read_text()
    paired = metrics["fine_tuning_vs_feature_extraction"]
    assert f"{paired['only_fine_tuning_right'] + paired['only_feature_extraction_right']} discordant" in markdown


def test_report_draws_accuracy_by_block_and_pretraining_and_says_what_they_show(reported):
    from pipeline.reporting.content import format_p

    markdown = (reported / "reports/report.md").read_text()
    blocks = json.loads((reported / "metrics/block_heads.json").read_text())
    section = markdown.split("## What each VGG16 block knows", 1)[1].split("\n## ", 1)[0]
    linked = re.findall(r"\]\(figures/([^)]+)\)", section)
    # accuracy against depth, beside the activation maps of the same blocks' outputs
    assert linked == ["accuracy_by_block.png", "blocks_block1_pool.png", "blocks_block2_pool.png"]
    pair = blocks["block2_vs_block1"]
    assert f"block2 against block1: {'block2 is better' if pair['p_value'] < 0.05 else 'no measurable difference'}" \
        f" ({format_p(pair['p_value'])}; {pair['only_block2_right']} test photos" in section
    assert "block1 58.3%" in section and "block2 83.3%" in section  # the tiny heads: 7 and 10 of 12 right
    assert "Here " in section  # the verdict on depth, in words

    metrics = json.loads((reported / "metrics/evaluate.json").read_text())
    section = markdown.split("## What pretraining buys", 1)[1].split("\n## ", 1)[0]
    paired = metrics["scratch_vs_feature_extraction"]
    discordant = paired["only_scratch_right"] + paired["only_feature_extraction_right"]
    assert format_p(paired['p_value']) in section and f"{discordant} discordant" in section
    assert re.findall(r"\]\(figures/([^)]+)\)", section) == ["pretraining.png"]
    assert "on its training photos" in section and "Here " in section


def test_report_per_class_table_is_read_from_per_class_csv(reported):
    per_class = pd.read_csv(reported / "plots/evaluate/per_class.csv", dtype={"class": str})
    page = (reported / "reports/report.html").read_text()
    table = ElementTree.fromstring(re.search(r'<table id="per-class".*?</table>', page, re.S).group(0))
    rows = [[cell.text for cell in row.iter("td")] for row in table.find("tbody")]
    assert len(rows) == len(per_class)
    assert [row[1] for row in rows] == list(per_class["class"])


def test_report_is_an_mlflow_run_with_its_cost(reported):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{reported / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'report'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["report.patterns.steps"] == "2"
    assert runs[0].data.metrics["visualize_seconds.fine_tuning.patterns"] > 0
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id, "report")} >= {
        "report/report.html", "report/report.md", "report/figures"}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(reported):
    page = (reported / "reports/report.html").read_text()
    with tempfile.TemporaryDirectory() as scratch:
        checked = Path(scratch) / "checked.html"
        checked.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
        profile = Path(scratch) / "profile"
        result = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", checked.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no check result from chromium (exit {result.returncode}): {result.stderr[-2000:]}"
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["images"] == page.count("<img ") > 10
    assert all(width > 0 for width in seen["widths"]), f"pictures that did not decode: {seen['widths']}"
    assert seen["results_rows"] == 5
    assert "test accuracy" in seen["results_headers"]


def test_every_stage_run_records_its_process_time(reported):
    """process_seconds (the stage's whole cost, imports included) and the process's peak
    resident memory are logged on success."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{reported / 'mlflow.db'}")
    runs = [run for run in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if run.data.tags["pipeline.stage"] in ("evaluate", "report")]
    assert len(runs) == 2
    for run in runs:
        wall = (run.info.end_time - run.info.start_time) / 1000
        assert run.data.metrics["process_seconds"] >= wall > 0
        assert 50 < run.data.metrics["peak_rss_mib"] < 8192  # a Python process with pandas, not kB or bytes


@pytest.mark.parametrize("kept, keep_by, unfreeze, says", [
    (0, "val_loss", 2, "Fine-tuning changed nothing: no epoch beat the trained head on validation loss"),
    (0, "val_accuracy", 2, "no epoch beat the trained head on validation accuracy, so it kept the head's weights"),
    (3, "val_accuracy", 2, "Fine-tuning trained the top 2 conv layers with the head and kept epoch 3 (the best validation accuracy)"),
    (2, "val_accuracy", 1, "Fine-tuning trained the top conv layer with the head and kept epoch 2 (the best validation accuracy)"),
])
def test_transfer_sentence_says_what_fine_tuning_did(kept, keep_by, unfreeze, says):
    from dataclasses import replace

    from pipeline.reporting.content import transfer_sentence

    features = model_result("feature_extraction", 88, 100)
    fine = replace(model_result("fine_tuning", 88, 100), training={"epochs": 4, "kept_epoch": kept},
                   key_params={"unfreeze": unfreeze, "kept by": keep_by})
    paired = {"fine_tuning_vs_feature_extraction": {"p_value": 1.0, "only_fine_tuning_right": 0,
                                                   "only_feature_extraction_right": 0}}
    sentence = transfer_sentence([features, fine], paired)
    assert sentence is not None and says in sentence


def blocks_metrics(rights: dict[int, int], pairs: dict[str, tuple[int, int, float]], total: int = 100) -> dict:
    from pipeline.evaluation import wilson_interval

    metrics = {f"block{block}": {"test_accuracy": right / total, "test_accuracy_ci95": list(wilson_interval(right, total)),
                                 "test_samples": total} for block, right in rights.items()}
    for key, (only_deeper, only_shallower, p_value) in pairs.items():
        deeper, shallower = key.split("_vs_")
        metrics[key] = {"p_value": p_value, f"only_{deeper}_right": only_deeper,
                        f"only_{shallower}_right": only_shallower}
    return metrics


@pytest.mark.parametrize("rights, pairs, verdict", [
    ({3: 70, 4: 85, 5: 95}, {"block4_vs_block3": (20, 5, 0.004), "block5_vs_block4": (12, 2, 0.013)},
     "each block holds measurably more"),
    ({3: 70, 4: 90, 5: 80}, {"block4_vs_block3": (25, 5, 0.0003), "block5_vs_block4": (2, 12, 0.013)},
     "the deepest block is not the best: block4 is"),
    ({3: 70, 4: 90, 5: 91}, {"block4_vs_block3": (25, 5, 0.0003), "block5_vs_block4": (3, 2, 1.0)},
     "block5 and block4 are not measurably different"),
])
def test_depth_sentences_state_what_the_curve_shows(rights, pairs, verdict):
    from pipeline.reporting.content import depth_sentences

    text = " ".join(depth_sentences(blocks_metrics(rights, pairs)))
    assert verdict in text
    assert "block3 70.0% (" in text and "block4 against block3: block4 is better (p = 0.004" in text \
        or "block4 against block3: block4 is better (p = 0.0003" in text
