"""`pipeline predict`: pictures as the models saw them, files that do not decode listed and
skipped, digits drawn on paper read as MNIST digits, bad input as one line."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import run_command
from pipeline.data.inputs import mnist_like, photo_input
from pipeline.errors import UserError
from pipeline.params import PredictParams
from pipeline.predict import load_classifier, predict, predict_files

P = PredictParams(batch_size=2, digit_box=20)


def jpeg(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory):
    from tiny_project import vgg_like

    path = tmp_path_factory.mktemp("models") / "photos.keras"
    vgg_like(seed=1).save(path)
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    """A folder as users have them: an RGB, a CMYK and a grey JPEG, a PNG (of another size
    each), a truncated JPEG, a PNG named .jpg, and a text file that is no picture."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    (folder / "rgb.jpg").write_bytes(jpeg(rgb))
    (folder / "cmyk.jpg").write_bytes(jpeg(rgb, "CMYK"))
    (folder / "grey.jpg").write_bytes(jpeg(rgb[..., 0]))
    (folder / "more" / "big.png").write_bytes(png(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)))
    whole = jpeg(rgb)
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "png_named.jpg").write_bytes(png(rgb))
    (folder / "notes.txt").write_text("not a picture")
    return folder


def test_a_folder_predicts_the_decodable_files_and_lists_the_rest(photo_model, mixed_folder):
    out, err = predict([mixed_folder], str(photo_model), "json", P)
    records = {json.loads(out)[i]["file"]: json.loads(out)[i] for i in range(len(json.loads(out)))}
    names = {path.split("/")[-1]: record for path, record in records.items()}
    assert set(names) == {"rgb.jpg", "cmyk.jpg", "grey.jpg", "big.png", "truncated.jpg", "png_named.jpg"}
    for name in ("rgb.jpg", "cmyk.jpg", "grey.jpg", "big.png"):
        assert names[name]["error"] is None and names[name]["class"] in ("0", "1")
        assert 0.5 <= names[name]["probability"] <= 1.0
    assert names["truncated.jpg"]["error"] == "corrupt or truncated JPEG"
    assert names["png_named.jpg"]["error"] == "PNG data named .jpg"
    assert names["truncated.jpg"]["class"] is None and err == ""

    table, skipped = predict([mixed_folder], str(photo_model), "table", P)
    assert len(table.splitlines()) == 4
    assert sorted(line.split(":")[0] for line in skipped.splitlines()) == [
        f"skipped {mixed_folder / 'png_named.jpg'}", f"skipped {mixed_folder / 'truncated.jpg'}"]


def test_predictions_are_the_models_outputs_on_the_decoded_photos(photo_model, mixed_folder):
    """What predict reports is the model on the same pixels the training decoder gives."""
    import keras

    from pipeline.evaluation import class_probabilities

    classifier = load_classifier(str(photo_model))
    files = [mixed_folder / "rgb.jpg", mixed_folder / "cmyk.jpg", mixed_folder / "more" / "big.png"]
    results = predict_files(classifier, files, P, progress=False)
    pixels = np.stack([photo_input(path.read_bytes(), path.suffix, 32, 32) for path in files])
    expected = class_probabilities(keras.models.load_model(photo_model).predict(pixels, verbose=0))
    for result, row in zip(results, expected):
        assert result.predicted == str(int(row.argmax()))
        assert result.probability == pytest.approx(float(row.max()), rel=1e-5)


def draw_digit(digit: str, canvas: tuple[int, int], box: tuple[int, int, int, int], width: int,
               ink: int, paper: int) -> np.ndarray:
    """A '1' (a vertical stroke) or a '7' (a bar and a diagonal) inside `box` of a canvas."""
    image = Image.new("L", canvas, paper)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    if digit == "1":
        draw.line([((left + right) // 2, top), ((left + right) // 2, bottom)], fill=ink, width=width)
    else:
        draw.line([(left, top), (right, top)], fill=ink, width=width)
        draw.line([(right, top), (left + (right - left) // 3, bottom)], fill=ink, width=width)
    return np.asarray(image)


def template_model(path):
    """A 'trained' MNIST classifier that knows a '1' and a '7' by their MNIST-format
    templates (zero-mean, so a blank or inverted field matches neither)."""
    import keras

    weights = np.zeros((28 * 28, 10), np.float32)
    for digit in ("1", "7"):
        template = draw_digit(digit, (28, 28), (9, 4, 18, 23), 2, 255, 0).astype(np.float32).reshape(-1) / 255
        template -= template.mean()
        weights[:, int(digit)] = 20 * template / np.linalg.norm(template)
    image = keras.Input((28, 28, 1))
    dense = keras.layers.Dense(10, activation="softmax")
    model = keras.Model(image, dense(keras.layers.Flatten()(image)))
    dense.set_weights([weights, np.zeros(10, np.float32)])
    model.save(path)


def test_a_digit_drawn_black_on_white_is_read_as_an_mnist_digit(tmp_path):
    """A big '1' and '7', drawn black on white off-centre: inverted, cropped, scaled into
    MNIST's 20-pixel box and centred, they are recognised; without the inversion the field
    would be blank (probability 0.1 each), without the centring they would miss their
    templates."""
    template_model(tmp_path / "digits.keras")
    for digit in ("1", "7"):
        drawing = draw_digit(digit, (300, 240), (30, 20, 120, 200), 14, ink=10, paper=235)
        Image.fromarray(drawing).save(tmp_path / f"drawn_{digit}.png")
        Image.fromarray(255 - drawing).convert("RGB").save(tmp_path / f"chalk_{digit}.jpg", quality=95)
    out, _ = predict([tmp_path], str(tmp_path / "digits.keras"), "json", P)
    found = {record["file"].split("/")[-1]: record for record in json.loads(out)}
    for name, record in found.items():
        digit = name.split("_")[1][0]
        assert record["class"] == digit and record["probability"] > 0.5, (name, record)

    field = mnist_like(np.asarray(Image.open(tmp_path / "drawn_7.png"), dtype=np.float64) / 255)
    assert field.shape == (28, 28, 1) and field.dtype == np.float32
    assert field[0].max() == 0 and field[-1].max() == 0 and field.max() == pytest.approx(1.0, abs=0.05)
    rows, columns = np.nonzero(field[..., 0] > 0.5)
    assert max(rows.max() - rows.min(), columns.max() - columns.min()) + 1 in (19, 20, 21)  # MNIST's 20 px box
    mass = field[..., 0] / field.sum()
    assert (mass.sum(axis=1) @ np.arange(28)) == pytest.approx(13.5, abs=1.0)  # centred by its mass


def test_bad_models_and_paths_are_user_errors(tmp_path, photo_model, mixed_folder):
    import keras

    with pytest.raises(UserError, match="no such file or folder"):
        predict([tmp_path / "missing.jpg"], str(photo_model), "table", P)
    with pytest.raises(UserError, match="--model .*nothing.keras: no such file"):
        predict([mixed_folder], str(tmp_path / "nothing.keras"), "table", P)
    (tmp_path / "junk.keras").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a Keras model file"):
        predict([mixed_folder], str(tmp_path / "junk.keras"), "table", P)
    features = keras.Input((4, 4, 512))
    keras.Model(features, keras.layers.Conv2D(8, 1)(features)).save(tmp_path / "feature_maps.keras")
    with pytest.raises(UserError, match="not an image classifier") as caught:
        predict([mixed_folder], str(tmp_path / "feature_maps.keras"), "table", P)
    assert "\n" not in str(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no picture files"):
        predict([tmp_path / "empty"], str(photo_model), "table", P)


def test_the_command_says_one_line_and_exits_2(tmp_path):
    from conftest import REPO

    result = run_command(["pipeline", "predict", "nowhere/", "--model", "models/finetuned.keras",
                          "--params", str(REPO / "params.yaml")], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: nowhere: no such file or folder"]
