from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.params import load_params, parse_params

from conftest import REPO


def shipped() -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())


def test_shipped_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.baseline.conv_filters == [32, 64, 64]
    assert params.mnist.files.train_images.sha256.startswith("ba8910")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("baseline", "epochs", -1, "baseline.epochs: input should be greater than 0"),
        ("baseline", "epochs", "five", "baseline.epochs: input should be a valid integer"),
        ("baseline", "epochs", 2.5, "baseline.epochs: input should be a valid integer"),
        ("baseline", "dropout", 1.0, "baseline.dropout: input should be less than 1"),
        ("baseline", "padding", "full", "baseline.padding: input should be 'valid' or 'same'"),
        ("baseline", "epochz", 3, "baseline.epochz: unknown key"),
        ("baseline", "learning_rate", "fast", "baseline.learning_rate: input should be a valid number"),
    ],
)
def test_bad_values_name_the_key(section, key, value, expected):
    raw = shipped()
    raw[section][key] = value
    with pytest.raises(UserError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert message.startswith("params.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_unknown_section_and_bad_hash():
    raw = shipped()
    raw["basline"] = {"epochs": 3}
    with pytest.raises(UserError, match="basline: unknown key"):
        parse_params(raw)
    raw = shipped()
    raw["mnist"]["files"]["test_labels"]["sha256"] = "abc"
    with pytest.raises(UserError, match=r"mnist.files.test_labels.sha256: string should match"):
        parse_params(raw)


def test_yaml_1_2_floats_and_file_errors(tmp_path: Path):
    text = (REPO / "params.yaml").read_text().replace("learning_rate: 0.001", "learning_rate: 1e-4")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").baseline.learning_rate == 1e-4
    (tmp_path / "broken.yaml").write_text("baseline: [1,\n")
    with pytest.raises(UserError, match="broken.yaml: not valid YAML"):
        load_params(tmp_path / "broken.yaml")
    with pytest.raises(UserError, match="missing.yaml: not found"):
        load_params(tmp_path / "missing.yaml")
