"""Training on the user's own data: a CSV table (`data.name: csv`) and an image folder (`data.name: image_folder`).

A real-looking CSV (id column, numbers, a string categorical column, missing cells, a string target) goes through
the real CLI: train a few steps, explain raw rows, export; the fitted preprocessing must round-trip through the
checkpoint and the exported config.json, and explanations of preprocessed raw rows must add up to the logits.
Bad input gets one line naming the file, row and column, and nothing is written into the run folder.
"""

from __future__ import annotations

import csv
import json
import warnings
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from training.cli import load_source, main
from training.data import load_dataset
from zoo.preprocessing import OutOfRangeWarning, PreprocessingError, TabularPreprocessor

STEPS = ["--set", "train.max_steps=4", "--set", "train.epochs=1", "--set", "data.batch_size=32"]


def write_fruit_csv(path: Path, n: int = 160, seed: int = 0) -> Path:
    """Fruit: weight (some missing), colour (text), diameter, harvest year (large mean, small std), origin (text,
    some `NA`), and a string target."""
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "weight_g", "colour", "diameter_cm", "year", "origin", "fruit"])
        for i in range(n):
            colour = str(rng.choice(["red", "green", "yellow"]))
            weight = rng.normal(150, 40)
            fruit = "apple" if colour == "red" or (colour == "green" and weight > 140) else (
                "banana" if colour == "yellow" else "pear")
            out.writerow([i, "" if i % 23 == 5 else f"{weight:.1f}", colour, f"{rng.normal(7, 1.5):.2f}",
                          int(rng.integers(2010, 2021)), "NA" if i % 31 == 7 else str(rng.choice(["ES", "FR", "IT"])),
                          fruit])
    return path


def write_config(folder: Path, data: dict, model: dict | None = None) -> Path:
    config = folder / "own.yaml"
    config.write_text(yaml.safe_dump({"name": "own", "data": data,
                                      "model": model or {"name": "shapnet_shallow", "args": {"hidden": [8]}}}))
    return config


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def fruit_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("own_csv")
    table = write_fruit_csv(folder / "fruit.csv")
    config = write_config(folder, {"name": "csv", "path": str(table), "target": "fruit", "drop": ["id"]})
    assert main(["--quiet", "train", str(config), "--output", str(folder / "run"), *STEPS]) == 0
    return folder, table


def test_csv_preprocessing_is_recorded_in_the_checkpoint(fruit_run) -> None:
    folder, _ = fruit_run
    info = load_source(str(folder / "run"), torch.device("cpu")).info
    assert info.class_names == ["apple", "banana", "pear"], "string targets keep their names (sorted)"
    assert info.feature_names == ["weight_g", "colour", "diameter_cm", "year", "origin"], "file order, id dropped"
    pre = info.preprocessing
    assert pre["categorical"] == ["colour", "origin"], "text columns are detected as categorical"
    assert pre["categories"]["colour"] == ["green", "red", "yellow"]
    gaps = {"weight_g": sum(i % 23 == 5 for i in range(160)), "origin": sum(i % 31 == 7 for i in range(160))}
    assert pre["missing"]["counts"] == gaps
    assert set(pre["missing"]["fill"]) == set(gaps) and pre["missing"]["fill"]["origin"] in ("ES", "FR", "IT")
    assert len(pre["standardize"]["mean"]) == 5 and pre["target"] == "fruit"


def test_raw_rows_round_trip_to_the_training_inputs(fruit_run) -> None:
    """Preprocessing the training file's own rows gives exactly the split tensors the model was trained on."""
    folder, table = fruit_run
    loaded = load_source(str(folder / "run"), torch.device("cpu"))
    x_all, y_all = loaded.model.preprocess.encode(table)
    bundle = load_dataset("csv", path=table, target="fruit", drop=["id"])
    for split in (bundle.train, bundle.val, bundle.test):
        for x, y in zip(split.features, split.labels):
            match = (x_all - x).abs().amax(1).argmin()
            assert float((x_all[match] - x).abs().max()) < 1e-6 and y_all[match] == int(y)
    # Columns may come in any order, the target is optional and dropped columns are ignored.
    rows = [{"fruit": "pear", "origin": "FR", "year": "2015", "diameter_cm": "6.5", "colour": "green",
             "weight_g": "120", "id": "x"}, {"origin": "", "year": 2012, "diameter_cm": 7, "colour": "red",
                                             "weight_g": None}]
    x, labels = loaded.model.preprocess.encode(rows)
    assert labels == [2, None]
    assert loaded.model.preprocess.inverse(x)[0] == pytest.approx([120.0, "green", 6.5, 2015.0, "FR"])
    fill = loaded.info.preprocessing["missing"]["fill"]
    assert loaded.model.preprocess.inverse(x)[1][0] == pytest.approx(fill["weight_g"])
    assert loaded.model.preprocess.inverse(x)[1][4] == fill["origin"]
    expl = loaded.model.explain(x)
    torch.testing.assert_close(expl.base + expl.attributions.sum(1), expl.output, atol=1e-5, rtol=1e-5)


def test_explain_cli_reads_raw_rows_and_names_classes(fruit_run, tmp_path: Path, capsys) -> None:
    folder, table = fruit_run
    lines = table.read_text().splitlines()
    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join(lines[:3]) + "\n")  # header + 2 rows, target and id included
    assert main(["explain", str(folder / "run"), "--input", str(rows), "--top", "5"]) == 0
    out = capsys.readouterr().out
    first = lines[1].split(",")
    assert "rows.csv row 1: predicted" in out and f"true {first[-1]}" in out
    assert f"colour = {first[2]}" in out, "printed values are the raw ones"
    assert main(["explain", str(folder / "run"), "--input", str(rows), "--raw"]) == 2
    assert "--raw is gone" in one_line_error(capsys)


def test_export_keeps_the_preprocessing(fruit_run, tmp_path: Path, capsys) -> None:
    import zoo

    folder, table = fruit_run
    export = tmp_path / "export"
    assert main(["--quiet", "export", str(folder / "run"), "--name", "shapnet_shallow", "--out", str(export),
                 "--fidelity-samples", "4"]) == 0
    config = json.loads((export / "config.json").read_text())
    trained = load_source(str(folder / "run"), torch.device("cpu"))
    assert config["data_info"] == trained.info.to_dict()
    model = zoo.load_pretrained(export)
    x_export, _ = model.preprocess.encode(table)
    x_run, _ = trained.model.preprocess.encode(table)
    assert torch.equal(x_export, x_run)
    torch.testing.assert_close(model(x_export), trained.model(x_run))
    assert main(["explain", str(export), "--input", str(table), "--top", "1"]) == 0
    assert "row 160: predicted" in capsys.readouterr().out
    assert main(["explain", str(export), "--index", "0"]) == 2  # the export does not carry the user's file
    assert "own csv data" in one_line_error(capsys)


def test_out_of_range_inputs_warn_once_naming_the_features(fruit_run, tmp_path: Path) -> None:
    folder, _ = fruit_run
    loaded = load_source(str(folder / "run"), torch.device("cpu"))
    pre = loaded.model.preprocess
    raw = torch.tensor([[150.0, 1.0, 7.0, 2015.0, 0.0]] * 3)  # raw numbers given where z-scores are expected
    row = {"weight_g": 150, "colour": "red", "diameter_cm": 7, "year": 2015, "origin": "ES"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.model(pre.transform([row]))  # in range: silent
    with pytest.warns(OutOfRangeWarning, match="were raw values given") as caught:
        loaded.model(raw)
    message = str(caught[0].message)
    assert "year" in message and "weight_g" in message and "colour" not in message and "raw values" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.model(raw)  # once per model
        loaded.model.explain(raw)
    fresh = load_source(str(folder / "run"), torch.device("cpu")).model
    with pytest.warns(OutOfRangeWarning, match="year"):
        expl = fresh.explain(raw)  # explain is guarded too, and still exact
    torch.testing.assert_close(expl.output, loaded.model(raw))
    copy = deepcopy(fresh).double()  # the guard follows copies (export explains a float64 copy)
    assert copy.explain.model is copy and copy.explain(raw.double()).output.dtype == torch.float64
    # The reverse: standardised values given as raw rows; the year column (mean ~2015, std ~3) gives it away.
    with pytest.warns(OutOfRangeWarning, match="already standardised") as caught:
        pre.transform([{"weight_g": 0.1, "colour": "red", "diameter_cm": -0.3, "year": 0.5, "origin": "ES"}])
    assert "year" in str(caught[0].message) and "weight_g" not in str(caught[0].message)


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_the_guard_is_quiet_on_real_rows_and_flags_raw_ones(name: str) -> None:
    """Real test rows reach |z| = 13.6 (Breast Cancer) and 50.9 (Digits): a fixed |z| > 10 would cry wolf."""
    bundle = load_dataset(name)
    pre = TabularPreprocessor.from_data_info(bundle.info)
    assert pre.out_of_range(bundle.test.features) == {}
    if name == "breast_cancer":  # (raw Digits pixels, 0..16, are within its range: nothing to catch there)
        raw = torch.tensor(pre.inverse(bundle.test.features[:4]), dtype=torch.float32)  # raw values as model input
        assert {"mean area", "worst area"} <= set(pre.out_of_range(raw))


# ------------------------------------------------------------------------------------------------ bad input
def _train_fails(folder: Path, data: dict, capsys, model: dict | None = None) -> str:
    run = folder / "run_bad"
    assert main(["train", str(write_config(folder, data, model)), "--output", str(run), *STEPS]) == 2
    assert not run.exists(), "nothing may be written before the data is validated"
    return one_line_error(capsys)


def test_unknown_target_column(tmp_path: Path, capsys) -> None:
    table = write_fruit_csv(tmp_path / "fruit.csv", n=20)
    err = _train_fails(tmp_path, {"name": "csv", "path": str(table), "target": "fruits"}, capsys)
    assert "fruit.csv" in err and "no target column 'fruits'" in err and "did you mean 'fruit'" in err
    table.write_text(table.read_text().replace(",", ";"))
    err = _train_fails(tmp_path, {"name": "csv", "path": str(table), "target": "fruit"}, capsys)
    assert "no target column 'fruit'" in err and "looks ';'-separated" in err


def test_non_numeric_value_in_a_numeric_column(tmp_path: Path, capsys) -> None:
    table = write_fruit_csv(tmp_path / "fruit.csv", n=40)
    lines = table.read_text().splitlines()
    cells = lines[12].split(",")
    cells[3] = "7;5"  # a decimal comma gone wrong
    lines[12] = ",".join(cells)
    table.write_text("\n".join(lines) + "\n")
    err = _train_fails(tmp_path, {"name": "csv", "path": str(table), "target": "fruit"}, capsys)
    assert "fruit.csv: row 12 (line 13), column 'diameter_cm'" in err and "'7;5' is not a number" in err


def test_empty_file_and_single_class(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    err = _train_fails(tmp_path, {"name": "csv", "path": str(empty), "target": "y"}, capsys)
    assert "empty.csv: the file is empty" in err
    one = tmp_path / "one.csv"
    one.write_text("a,y\n1,x\n2,x\n3,x\n")
    assert "a single class ('x')" in _train_fails(tmp_path, {"name": "csv", "path": str(one), "target": "y"}, capsys)


def test_explain_rows_with_other_columns_or_bad_cells(fruit_run, tmp_path: Path, capsys) -> None:
    folder, _ = fruit_run
    other = tmp_path / "other.csv"
    other.write_text("weight_g,colour,diameter,year,origin\n150,red,7,2015,ES\n")
    assert main(["explain", str(folder / "run"), "--input", str(other)]) == 2
    err = one_line_error(capsys)
    assert "other.csv" in err and "missing ['diameter_cm'], unexpected ['diameter']" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("weight_g,colour,diameter_cm,year,origin\n150,red,7,2015,ES\n150,purple,7,2015,ES\n")
    assert main(["explain", str(folder / "run"), "--input", str(bad)]) == 2
    assert "bad.csv: row 2 (line 3), column 'colour': 'purple' is not a category seen in training" in one_line_error(
        capsys)
    with pytest.raises(PreprocessingError, match="row 1 lacks column"):
        load_source(str(folder / "run"), torch.device("cpu")).model.preprocess([{"weight_g": 1}])


def test_missing_values_can_be_refused(tmp_path: Path, capsys) -> None:
    table = write_fruit_csv(tmp_path / "fruit.csv", n=30)
    err = _train_fails(tmp_path, {"name": "csv", "path": str(table), "target": "fruit", "missing": "error"}, capsys)
    assert "fruit.csv: row 6 (line 7), column 'weight_g': missing value" in err


def test_own_data_keys_are_checked(tmp_path: Path, capsys) -> None:
    err = _train_fails(tmp_path, {"name": "breast_cancer", "target": "y"}, capsys)
    assert "data.target only applies to data.name=csv" in err
    assert "needs data.path" in _train_fails(tmp_path, {"name": "csv", "target": "y"}, capsys)


# ------------------------------------------------------------------------------------------------ images
def write_image_folder(root: Path, classes: tuple[str, ...] = ("circle", "square"), per_class: int = 8) -> Path:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB" if i % 2 else "L", (20 + i, 16), 0)  # mixed modes and sizes on purpose
            draw = ImageDraw.Draw(image)
            x, y = (int(v) for v in rng.integers(1, 6, size=2))
            box = (x, y, x + 8, y + 8)
            (draw.ellipse if k == 0 else draw.rectangle)(box, fill=255 if image.mode == "L" else (255, 200, 50))
            image.save(root / name / f"{i}.png")
    (root / classes[0] / "notes.txt").write_text("not an image: skipped")
    return root


def test_image_folder_trains_and_explains(tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "shapes")
    bundle = load_dataset("image_folder", path=folder, image_size=[12, 10], channels=1, val_fraction=0.2)
    assert bundle.info.class_names == ["circle", "square"] and bundle.info.input_shape == (1, 12, 10)
    assert sum(bundle.sizes().values()) == 16
    assert abs(float(bundle.train.features.mean())) < 1e-5, "normalised with the train split's statistics"
    config = write_config(tmp_path, {"name": "image_folder", "path": str(folder), "image_size": 8, "channels": 3},
                          {"name": "shapnet_conv", "args": {"channels": [4], "hidden": [8], "kernel_size": 2}})
    run = tmp_path / "run"
    assert main(["--quiet", "train", str(config), "--output", str(run), *STEPS]) == 0
    info = load_source(str(run), torch.device("cpu")).info
    assert info.input_shape == (3, 8, 8) and info.preprocessing["kind"] == "image_folder"
    assert main(["explain", str(run), "--index", "0", "--top", "2"]) == 0
    assert "test[0]: predicted" in capsys.readouterr().out


def test_image_folder_with_one_class(tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "shapes", classes=("circle",))
    err = _train_fails(tmp_path, {"name": "image_folder", "path": str(folder)}, capsys)
    assert "shapes: found 1 class folder(s) ['circle']" in err and "at least two classes" in err


def test_unreadable_image(tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "shapes")
    (folder / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = _train_fails(tmp_path, {"name": "image_folder", "path": str(folder)}, capsys)
    assert "square/broken.png: unreadable image" in err
