"""`Explanation.top / plot / to_shap / to_pandas` and the `predicted` property, on real ShapNets' explanations."""

from __future__ import annotations

import builtins
from pathlib import Path

import matplotlib
import pytest
import torch

from shapnets import ConvShapNet, Explanation, ShallowShapNet, exact_shapley
from shapnets.explanation import RankedAttribution, signed_sum

matplotlib.use("Agg")
import matplotlib.pyplot as plt

D, B, C = 12, 5, 3


@pytest.fixture(scope="module")
def tabular() -> tuple[Explanation, torch.Tensor]:
    torch.manual_seed(0)
    model = ShallowShapNet(D, C, [tuple(range(i, i + 3)) for i in range(0, D, 3)],
                           feature_names=[f"f{i}" for i in range(D)]).double().eval()
    x = torch.randn(B, D, dtype=torch.float64)
    with torch.no_grad():
        expl = model.explain(x)
    expl.class_names = ["low", "mid", "high"]
    return expl, x


@pytest.fixture(scope="module")
def pixels() -> tuple[Explanation, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvShapNet(1, 4, channels=(4,), hidden=(8,)).eval()
    x = torch.rand(2, 1, 6, 6)
    with torch.no_grad():
        return model.explain(x), x


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_predicted_is_a_property(tabular) -> None:
    expl, _ = tabular
    assert isinstance(type(expl).__dict__["predicted"], property)
    torch.testing.assert_close(expl.predicted, expl.output.argmax(1))


def test_top_is_sorted_by_magnitude_and_matches_the_attributions(tabular) -> None:
    expl, _ = tabular
    for index in (0, 3, -1):
        c = int(expl.output[index].argmax())
        ranked = expl.top(4, index)
        assert len(ranked) == 4 and all(isinstance(r, RankedAttribution) for r in ranked)
        magnitudes = [abs(r.value) for r in ranked]
        assert magnitudes == sorted(magnitudes, reverse=True)
        phi = expl.attributions[index, :, c]
        assert magnitudes[0] == pytest.approx(float(phi.abs().max()))
        assert magnitudes[-1] >= float(phi.abs().sort(descending=True).values[4])  # nothing larger left out
        for r in ranked:
            assert r.value == pytest.approx(float(phi[r.player[0]])) and r.name == f"f{r.player[0]}"
    everything = expl.top(100, 1, target=2)
    assert len(everything) == D
    assert sum(r.value for r in everything) == pytest.approx(float(expl.output[1, 2] - expl.base[1, 2]))


def test_top_for_pixels_returns_positions(pixels) -> None:
    expl, _ = pixels
    ranked = expl.top(3, 1, target=0)
    for r in ranked:
        h, w = r.player
        assert r.value == pytest.approx(float(expl.attributions[1, h, w, 0]))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_top_rejects_a_bad_k(tabular, bad) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        tabular[0].top(bad)


def test_top_rejects_a_sample_out_of_range(tabular) -> None:
    with pytest.raises(IndexError, match="out of range"):
        tabular[0].top(3, index=B)


def test_signed_sum_never_doubles_a_sign() -> None:
    assert signed_sum(1.037, 10.908) == "base 1.037 + 10.908"
    assert signed_sum(1.037, -2.1) == "base 1.037 - 2.100"
    assert signed_sum(-0.5, -0.25, 2) == "base -0.50 - 0.25"


def _texts(fig) -> str:
    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), *[t.get_text() for t in ax.get_yticklabels()],
                  *[t.get_text() for t in ax.texts]]
    parts += [fig._suptitle.get_text()] if fig._suptitle is not None else []
    return "\n".join(parts)


def test_waterfall_shows_k_features_and_sums_the_rest(tabular) -> None:
    expl, x = tabular
    k = 4
    fig = expl.plot(2, top=k, data=x, sample_id="test[2]", label=1)
    bars = fig.axes[0].patches
    assert len(bars) == k + 1  # the k largest and one bar holding the other D - k
    text = _texts(fig)
    assert f"{D - k} other features" in text and f"{D - k} of {D} features not shown" in text
    assert "test[2]" in text and "true mid" in text
    assert "+ +" not in text and "+ -" not in text
    assert f"f{expl.top(1, 2)[0].player[0]} = {float(x[2, expl.top(1, 2)[0].player[0]]):.4g}" in text
    # The bars walk from the base to the output: the last one ends at the output.
    c = int(expl.output[2].argmax())
    ends = sorted((p.get_y(), p.get_x() + p.get_width()) for p in bars)
    assert ends[-1][1] == pytest.approx(float(expl.output[2, c]), abs=1e-6)
    assert sum(p.get_width() for p in bars) == pytest.approx(float(expl.output[2, c] - expl.base[2, c]), abs=1e-6)


def test_bar_kind_shows_k_bars_and_a_note(tabular) -> None:
    expl, _ = tabular
    fig = expl.plot(0, top=5, kind="bar", target=0)
    assert len(fig.axes[0].patches) == 5
    assert f"{D - 5} of {D} features not shown" in _texts(fig)
    fig = expl.plot(0, top=D, kind="bar")
    assert len(fig.axes[0].patches) == D and f"all {D} features shown" in _texts(fig)


def test_plot_rejects_bad_arguments(tabular) -> None:
    expl, _x = tabular
    with pytest.raises(ValueError, match="kind"):
        expl.plot(kind="pie")
    with pytest.raises(ValueError, match="top"):
        expl.plot(top=0)
    with pytest.raises(ValueError, match="feature values"):
        expl.plot(feature_values=["1", "2"])


def test_pixel_plot_is_a_heat_map_over_the_image(pixels, tmp_path: Path) -> None:
    expl, x = pixels
    fig = expl.plot(1, top=3, data=x)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2  # the image, the heat map over it
    heat = images[1].get_array()
    c = int(expl.output[1].argmax())
    assert torch.allclose(torch.as_tensor(heat.data), expl.attributions[1, ..., c].double(), atol=1e-6)
    assert "3 of 36 pixels ringed" in _texts(fig)
    fig.savefig(tmp_path / "p.png")
    many = expl.plot(0, all_classes=True)
    assert sum(bool(ax.get_images()) for ax in many.axes) == expl.num_outputs


def test_to_shap_keeps_local_accuracy_and_names(tabular) -> None:
    pytest.importorskip("shap", reason="shap is an optional extra: pip install 'shapnets[shap]'")
    expl, x = tabular
    sv = expl.to_shap(data=x)
    assert sv.values.shape == (B, D, C) and sv.base_values.shape == (B, C) and sv.data.shape == (B, D)
    assert list(sv.feature_names) == [f"f{i}" for i in range(D)]
    assert list(sv.output_names) == ["low", "mid", "high"]
    torch.testing.assert_close(torch.as_tensor(sv.values.sum(1) + sv.base_values), expl.output.double())
    one = expl.to_shap(target="predicted", data=x)
    assert one.values.shape == (B, D) and one.base_values.shape == (B,)
    predicted_output = expl.output.gather(1, expl.predicted[:, None])[:, 0].double()
    torch.testing.assert_close(torch.as_tensor(one.values.sum(1) + one.base_values), predicted_output)


def test_to_shap_values_are_the_exact_shapley_values(tabular) -> None:
    pytest.importorskip("shap", reason="shap is an optional extra")
    _expl, x = tabular
    model = ShallowShapNet(D, C, [tuple(range(i, i + 3)) for i in range(0, D, 3)]).double().eval()
    with torch.no_grad():
        own, oracle = model.explain(x), exact_shapley(model, x, model.reference)
    torch.testing.assert_close(torch.as_tensor(own.to_shap(target=1).values), oracle.attributions[..., 1])


def test_shap_plots_render_our_explanations(tabular, tmp_path: Path) -> None:
    shap = pytest.importorskip("shap", reason="shap is an optional extra: pip install 'shapnets[shap]'")
    expl, x = tabular
    sv = expl.to_shap(target=0, data=x)
    for name, draw in [("waterfall", lambda: shap.plots.waterfall(sv[0], show=False)),
                       ("multi_output_waterfall", lambda: shap.plots.waterfall(expl.to_shap(data=x)[1, :, 2],
                                                                               show=False)),
                       ("beeswarm", lambda: shap.plots.beeswarm(sv, show=False)),
                       ("bar", lambda: shap.plots.bar(sv, show=False))]:
        draw()
        path = tmp_path / f"{name}.png"
        plt.gcf().savefig(path)
        plt.close("all")
        assert path.stat().st_size > 1000, name


def test_measurement_channels_count_as_one_value_per_feature(tabular) -> None:
    pytest.importorskip("shap", reason="shap is an optional extra")
    expl, x = tabular
    assert (expl.to_shap(data=x[..., None]).data == x.numpy()).all()  # `(B, D, 1)` inputs, as the demo feeds
    fig = expl.plot(3, top=2, data=x[..., None])
    assert f"= {float(x[3, expl.top(1, 3)[0].player[0]]):.4g}" in _texts(fig)


def test_to_shap_rejects_mismatched_data(tabular) -> None:
    pytest.importorskip("shap", reason="shap is an optional extra")
    expl, x = tabular
    with pytest.raises(ValueError, match="does not match"):
        expl.to_shap(data=x[:, :3])


def test_to_pandas_wide_and_long(tabular) -> None:
    pytest.importorskip("pandas", reason="pandas comes with the shap extra")
    expl, x = tabular
    wide = expl.to_pandas()
    assert list(wide.columns[:3]) == ["class", "output", "base"] and list(wide.columns[3:]) == expl.player_labels()
    assert list(wide["class"]) == [expl.class_names[int(c)] for c in expl.predicted]
    feature_sum = wide[expl.player_labels()].sum(axis=1)
    torch.testing.assert_close(torch.tensor((wide["base"] + feature_sum).to_numpy()),
                               torch.tensor(wide["output"].to_numpy()))
    long = expl.to_pandas(target=1, data=x, long=True)
    assert len(long) == B * D and set(long.columns) == {"sample", "player", "name", "class", "attribution", "value"}
    row = long[(long["sample"] == 3) & (long["player"] == 7)].iloc[0]
    assert row["attribution"] == pytest.approx(float(expl.attributions[3, 7, 1]))
    assert row["value"] == pytest.approx(float(x[3, 7])) and row["class"] == "mid"


def test_missing_optional_packages_name_the_extra(tabular, monkeypatch) -> None:
    expl, _ = tabular
    real_import = builtins.__import__

    def no_optional(name, *args, **kwargs):
        if name.split(".")[0] in ("shap", "pandas", "matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    monkeypatch.setattr("importlib.import_module", lambda name: no_optional(name))
    with pytest.raises(ImportError, match=r"shapnets\[shap\]"):
        expl.to_shap()
    with pytest.raises(ImportError, match=r"pandas.*shapnets\[shap\]"):
        expl.to_pandas()
    with pytest.raises(ImportError, match=r"shapnets\[viz\]"):
        expl.plot()


def test_the_library_imports_no_optional_package() -> None:
    import subprocess
    import sys

    code = ("import sys, shapnets; bad = [m for m in ('matplotlib', 'shap', 'pandas') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
