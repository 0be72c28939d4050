"""`shapnets zoo info NAME` (a short summary; `--json` the full record) and "did you mean" for misspelt names."""

from __future__ import annotations

import json

import pytest
import timm

import zoo
from training.cli import main

LABELS = ("architecture", "data", "accuracy", "fidelity", "size", "weights", "card", "full record")


def _fields(text: str) -> dict[str, str]:
    """`  label  value` lines of a summary, by label."""
    found = {}
    for line in text.splitlines()[1:]:
        label = next((k for k in (*LABELS, "trained by") if line.strip().startswith(k + "  ")), None)
        if label:
            found[label] = line.strip()[len(label):].strip()
    return found


def test_summary_of_a_shipped_model_states_what_the_record_holds(capsys) -> None:
    name = zoo.list_models("shapnet_deep_*", pretrained=True)[0]
    info = zoo.model_info(name)
    assert main(["zoo", "info", name]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 12, "a summary, not the record"
    assert text.splitlines()[0] == f"{name}: {info['pretrained_cfg']['description']}"
    fields = _fields(text)
    assert set(LABELS) <= set(fields)
    assert fields["architecture"].startswith(f"{info['architecture']} ({info['class']})")
    assert fields["data"].startswith(str(info["dataset"]))
    assert f"test {100 * info['metrics']['test_accuracy']:.2f}%" in fields["accuracy"]
    assert f"{info['fidelity']['rel_l2_error_vs_exact_shapley']:.3g}" in fields["fidelity"]
    assert f"{info['num_params']:,} parameters" in fields["size"] and "sha256 verified" in fields["size"]
    assert fields["card"] == info["card_path"] and fields["weights"] == info["weights_path"]
    assert fields["full record"] == f"shapnets zoo info {name} --json"


def test_json_prints_the_full_record(capsys) -> None:
    name = zoo.list_models("shapnet_shallow_*", pretrained=True)[0]
    assert main(["zoo", "info", name, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(json.dumps(zoo.model_info(name), default=str))


def test_summary_of_an_untrained_architecture_says_what_is_missing(capsys) -> None:
    assert main(["zoo", "info", "shapnet_deep"]) == 0
    fields = _fields(capsys.readouterr().out)
    assert fields["accuracy"] == "not recorded" and fields["fidelity"] == "not recorded"
    assert "no weights shipped" in fields["size"] and fields["data"].startswith("not trained")


def test_a_misspelt_name_gets_did_you_mean_from_the_zoo() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'shapnet_shalow_adult'\. Did you mean 'shapnet_shallow_adu"):
        zoo.create_model("shapnet_shalow_adult")
    with pytest.raises(ValueError, match=r"Close timm models: \['resnet18'"):
        zoo.create_model("resnt18")
    assert zoo.did_you_mean("capsnet_small_mnst").startswith("Did you mean 'capsnet_small_mnist'")
    assert zoo.did_you_mean("completely_different") == ""


def test_a_misspelt_zoo_name_gets_did_you_mean_from_timm_too() -> None:
    with pytest.raises(RuntimeError, match=r"^Unknown model \(shapnet_shalow_adult\)\. Did you mean "
                                           r"'shapnet_shallow_adult'"):
        timm.create_model("shapnet_shalow_adult")
    with pytest.raises(RuntimeError, match=r"^Unknown model \(qqqq\)$"):  # not near a zoo name: timm's own message
        timm.create_model("qqqq")
    assert type(timm.create_model("shapnet_deep", in_features=3, num_classes=2)).__name__ == "DeepShapNet"
    # Wrapped once (functools.wraps keeps timm's function as __wrapped__), and timm.models sees the same function.
    assert timm.models.create_model is timm.create_model
    assert not hasattr(timm.create_model.__wrapped__, "__wrapped__")


def test_shipped_cards_load_by_name_not_by_a_local_path() -> None:
    """A card exported into the zoo's own folder shows `zoo.create_model(name, pretrained=True)`: a path would be
    the exporting machine's, useless to a reader."""
    from pathlib import Path

    import zoo as zoo_package

    cards = sorted((Path(zoo_package.__file__).parent / "cards").glob("*.md"))
    assert cards
    for card in cards:
        text = card.read_text()
        assert f'zoo.create_model("{card.stem}", pretrained=True)' in text, card.name
        assert "load_pretrained(\"/" not in text, card.name
