"""What a run shows in TensorBoard beyond scalars, and mlplab-predict: real runs on synthetic data, read back with
TensorBoard's own reader and server, and predictions checked against the model on the original tensors."""

import csv
import io
import json
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC_RUN, run_cli, tensorboard_server
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlplab.cli.evaluate import load_data, load_model

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# A learning rate low enough that the model still makes mistakes on the (easy) synthetic data.
RUN = [
    *SYNTHETIC_RUN,
    "trainer.max_epochs=2",
    "scheduler=cosine",
    "optimizer.lr=3e-5",
    "callbacks.weight_histograms.every_n_epochs=1",
]


@pytest.fixture(scope="module")
def run(synthetic_data_dir, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("inspected")
    result = run_cli(["mlplab-train", *RUN], cwd, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (cwd / "outputs" / "runs").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def events(run) -> EventAccumulator:
    accumulator = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def test_predictions(run, synthetic_data_dir, tmp_path_factory) -> list[dict[str, str]]:
    """Per-sample test predictions of the tested (best) checkpoint, from mlplab-predict inputs=test."""
    output = tmp_path_factory.mktemp("predictions") / "test.csv"
    result = run_cli(["mlplab-predict", f"run={run}", "inputs=test", f"output={output}"], run, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    with output.open() as file:
        return list(csv.DictReader(file))


def text(events: EventAccumulator, tag: str) -> str:
    (event,) = events.Tensors(f"{tag}/text_summary")
    return event.tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_every_view_is_in_the_event_files(events):
    tags = events.Tags()
    assert len(events.Images("val/confusion_matrix")) == 2  # after each epoch
    for tag in ("val/confusion_matrix", "test/confusion_matrix", "test/misclassified"):
        image = Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string))
        assert image.mode == "RGB" and min(image.size) > 100, tag
    assert {f"weights/{name}" for name in ("1.weight", "1.bias", "3.weight")} <= set(tags["histograms"])
    assert {f"gradients/{name}" for name in ("1.weight", "1.bias", "3.weight")} <= set(tags["histograms"])
    assert len(events.Histograms("weights/1.weight")) == 2
    assert tags["graph"] and "Linear" in str(events.Graph())
    architecture, config = text(events, "run/architecture"), text(events, "run/config")
    assert "Linear(in_features=784, out_features=512" in architecture and "**total**" in architecture
    assert (
        "depth: 2" in config
        and "_target_: torch.optim.lr_scheduler.CosineAnnealingLR" in config
        and "seed: 42" in config
    )
    lr = [point.value for point in events.Scalars("train/lr")]
    assert lr[0] == pytest.approx(3e-5) and lr[1] < lr[0]  # the cosine schedule, epoch by epoch


@pytest.mark.slow
def test_confusion_matrix_and_per_class_accuracy_equal_the_test_predictions(events, test_predictions, run):
    expected = np.zeros((10, 10), dtype=int)  # counted here, from mlplab-predict's independent pass
    for row in test_predictions:
        expected[int(row["label"]), int(row["predicted"])] += 1
    table = text(events, "test/confusion_matrix").splitlines()
    assert table[0].split(" | ")[1:] == [*CLASSES[:-1], CLASSES[-1] + " |"]
    counts = np.array([[int(cell) for cell in line.strip("| ").split(" | ")[1:]] for line in table[2:]])
    assert (counts == expected).all()
    for index, name in enumerate(CLASSES):
        (point,) = events.Scalars(f"test/acc_per_class/{name.replace('/', '_')}")
        assert point.value == pytest.approx(expected[index, index] / max(expected[index].sum(), 1))
    recorded = json.loads((run / "metrics.json").read_text())["test/acc"]
    assert np.trace(expected) / expected.sum() == pytest.approx(recorded)


def where_in(grid: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Every (row, column) at which ``patch`` appears, pixel for pixel, in ``grid`` (both H x W x 3)."""
    height, width = patch.shape[:2]
    starts = np.argwhere((grid[: grid.shape[0] - height + 1, : grid.shape[1] - width + 1] == patch[0, 0]).all(axis=2))
    return [(y, x) for y, x in starts if np.array_equal(grid[y : y + height, x : x + width], patch)]


def test_misclassified_grid_shows_the_most_confident_mistakes(events, test_predictions, run, synthetic_data_dir):
    wrong = sorted(
        (row for row in test_predictions if row["correct"] == "0"), key=lambda row: -float(row["probability"])
    )[:32]
    assert wrong, "the run should make mistakes"
    datamodule = load_data(run / "checkpoints" / "best.ckpt", synthetic_data_dir)
    datamodule.setup("test")
    images = datamodule.splits["test"].images[[int(row["index"]) for row in wrong]].numpy()
    (event,) = events.Images("test/misclassified")
    shown = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    # Each mistake, enlarged three times (as the README says), is in the grid, in order of confidence: row by row.
    places = []
    for image in images:
        patch = np.repeat(np.repeat(image[0], 3, axis=0), 3, axis=1)
        found = where_in(shown, np.stack([patch] * 3, axis=-1))
        assert found, "a mistake is missing from the grid"
        places.append(found[0])
    assert places == sorted(places, key=lambda place: (place[0], place[1]))  # reading order


@pytest.mark.slow
def test_histograms_are_off_by_default(synthetic_data_dir, tmp_path):
    result = run_cli(["mlplab-train", *SYNTHETIC_RUN], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert not events.Tags()["histograms"] and "val/confusion_matrix" in events.Tags()["images"]


def test_tensorboard_server_lists_the_images(run):
    wanted = {"val/confusion_matrix", "test/confusion_matrix", "test/misclassified"}
    with tensorboard_server(run) as base:
        deadline, tags = time.monotonic() + 90, {}
        while time.monotonic() < deadline and not wanted <= set(tags.get(".", {})):
            try:
                with urllib.request.urlopen(f"{base}/images/tags", timeout=30) as response:
                    tags = json.loads(response.read())
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
    assert wanted <= set(tags["."])


@pytest.mark.slow
def test_predict_reads_images_as_the_dataset_has_them(run, synthetic_data_dir, tmp_path):
    checkpoint = run / "checkpoints" / "best.ckpt"
    model, data = load_model(checkpoint), load_data(checkpoint, synthetic_data_dir)
    data.setup("test")
    originals = data.splits["test"].images[:4]
    pixels = [image[0].numpy() for image in originals]
    Image.fromarray(pixels[0]).save(tmp_path / "a_same_size.png")
    Image.fromarray(pixels[1]).resize((56, 56), Image.Resampling.NEAREST).convert("RGB").save(tmp_path / "b_rgb_x2.png")
    Image.fromarray(pixels[2]).resize((84, 84), Image.Resampling.NEAREST).save(tmp_path / "c_gray_x3.png")
    Image.fromarray(pixels[3]).convert("RGB").save(tmp_path / "d_rgb.png")
    (tmp_path / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    result = run_cli(["mlplab-predict", f"run={run}", f"inputs={tmp_path}", "format=json", "top_k=3"], tmp_path)
    assert result.returncode == 1  # one input could not be read
    assert "e_corrupt.png" in result.stderr and "Traceback" not in result.stderr
    answers = json.loads(result.stdout)
    assert [Path(answer["path"]).name for answer in answers] == sorted(p.name for p in tmp_path.iterdir())
    assert "error" in answers[4] and "class" not in answers[4]
    with torch.inference_mode():
        probabilities = model(originals).softmax(dim=1)
    for answer, expected in zip(answers[:4], probabilities):
        assert answer["class"] == CLASSES[int(expected.argmax())]
        assert answer["probability"] == pytest.approx(float(expected.max()), abs=1e-4)
        assert [top["class"] for top in answer["top"]] == [CLASSES[i] for i in expected.topk(3).indices.tolist()]

    table = run_cli(["mlplab-predict", f"run={run}", f"inputs=[{tmp_path / 'a_same_size.png'}]"], tmp_path)
    assert table.returncode == 0 and CLASSES[int(probabilities[0].argmax())] in table.stdout.splitlines()[1]


def test_predict_on_the_test_set_agrees_with_the_recorded_test_accuracy(test_predictions, run):
    assert len(test_predictions) == 200
    accuracy = sum(int(row["correct"]) for row in test_predictions) / len(test_predictions)
    assert accuracy == pytest.approx(json.loads((run / "metrics.json").read_text())["test/acc"])
    row = test_predictions[0]
    assert float(row["probability"]) == pytest.approx(max(float(row[f"p_{name}"]) for name in CLASSES))


@pytest.mark.slow
def test_predict_takes_a_glob_and_the_last_checkpoint(run, synthetic_data_dir, tmp_path):
    data = load_data(run / "checkpoints" / "last.ckpt", synthetic_data_dir)
    data.setup("test")
    for index in range(3):
        Image.fromarray(data.splits["test"].images[index, 0].numpy()).save(tmp_path / f"image{index}.png")
    (tmp_path / "notes.txt").write_text("not matched by the glob")
    result = run_cli(
        ["mlplab-predict", f"run={run}", "checkpoint=last", f"inputs='{tmp_path}/image*.png'", "format=json"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    predicted = json.loads(result.stdout)
    assert [Path(p["path"]).name for p in predicted] == ["image0.png", "image1.png", "image2.png"]
    model = load_model(run / "checkpoints" / "last.ckpt")  # the last checkpoint's own answers
    expected = model(data.splits["test"].images[:3]).argmax(dim=1).tolist()
    assert [CLASSES.index(p["class"]) for p in predicted] == expected


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: what a decompression bomb looks like at first."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR's data starts after 8 + 4 + 4 bytes
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the chunk's CRC over its type and data
    return bytes(data)


@pytest.mark.slow
def test_a_decompression_bomb_is_reported_and_the_other_images_are_predicted(run, synthetic_data_dir, tmp_path):
    checkpoint = run / "checkpoints" / "best.ckpt"
    data = load_data(checkpoint, synthetic_data_dir)
    data.setup("test")
    Image.fromarray(data.splits["test"].images[0, 0].numpy()).save(tmp_path / "a_good.png")
    (tmp_path / "b_bomb.png").write_bytes(png_claiming(30000, 30000))  # 900 megapixels
    result = run_cli(["mlplab-predict", f"run={run}", f"inputs={tmp_path}", "format=json"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    good, bomb = json.loads(result.stdout)
    assert good["path"].endswith("a_good.png") and good["class"] in CLASSES
    assert bomb["path"].endswith("b_bomb.png") and "30000x30000 pixels, more than the limit" in bomb["error"]
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"mlplab-predict: {tmp_path / 'b_bomb.png'}: cannot read it as an image")


@pytest.mark.slow
def test_predict_refuses_bad_input_in_one_line(run, tmp_path):
    for args, needle in [
        ([f"run={run}", f"inputs={tmp_path / 'nothing.png'}"], "does not exist"),
        ([f"run={run}", f"inputs={tmp_path}"], "holds no images"),
        ([f"run={tmp_path}", "inputs=test"], "run="),
        ([f"run={run}", "inputs=test", "top_k=0"], "top_k"),
    ]:
        result = run_cli(["mlplab-predict", *args], tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, args
        (line,) = result.stderr.splitlines()
        assert line.startswith("mlplab-predict: error:") and needle in line, args
