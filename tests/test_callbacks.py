"""The evaluation callbacks' figures (callbacks/): units, InD apart from the OOD sets, the AES threshold, the
distance in each histogram's title, class names, a labelled score and a colour bar; and the benchmarks' class
names that the reconstruction grids show."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffguard_pl.callbacks.curves import aes_thresholds, band_series, curve_figure, summarize_curves  # noqa: E402
from diffguard_pl.callbacks.reconstructions import reconstruction_figure  # noqa: E402
from diffguard_pl.callbacks.score_plots import histogram_figure  # noqa: E402
from diffguard_pl.config import AESConfig, DataConfig  # noqa: E402
from diffguard_pl.records.columns import describe_column  # noqa: E402

GROUPS = {"near_set": "near", "far_set": "far"}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def curve_rows():
    """Quantile rows of three sets' PSNR curves over 3 steps (6 samples each, falling with the step)."""
    g = torch.Generator().manual_seed(0)
    curves = {name: {"psnr": start - torch.arange(3.0) * 10 + torch.rand(6, 3, generator=g)}
              for name, start in (("far_set", 30.0), ("ind", 60.0), ("near_set", 50.0))}
    return summarize_curves(curves)


def test_curve_plot_has_units_ind_apart_and_the_aes_threshold():
    fig = curve_figure(curve_rows(), "psnr", GROUPS, threshold=6.39)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "PSNR of x_t against x0 (dB)" and ax.get_xlabel() == "inversion step"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines)[:3] == ["InD", "near_set (near-OOD)", "far_set (far-OOD)"]  # InD first, then by group
    ind, near, far = lines["InD"], lines["near_set (near-OOD)"], lines["far_set (far-OOD)"]
    assert ind.get_color() == "black" and ind.get_linewidth() > max(near.get_linewidth(), far.get_linewidth())
    assert near.get_linestyle() == "--" and far.get_linestyle() == "-" and near.get_color() != far.get_color()
    threshold = lines["AES threshold 6.39 dB (stop below)"]
    assert set(threshold.get_ydata()) == {6.39}
    medians = [r["q50"] for r in curve_rows() if r["set"] == "ind"]
    assert list(ind.get_ydata()) == pytest.approx(medians)  # the median, with the 10-90% band around it
    no_aes = curve_figure(curve_rows(), "psnr", GROUPS)  # AES off
    assert not [line for line in no_aes.axes[0].get_lines() if "AES" in line.get_label()]


def test_aes_thresholds_are_those_in_force():
    assert aes_thresholds(AESConfig(enabled=True, psnr=6.39, ssim=0.5)) == {"psnr": 6.39, "ssim": 0.5}
    assert aes_thresholds(AESConfig(enabled=False, psnr=6.39)) == {}  # set but not used: nothing to mark
    assert aes_thresholds(None) == {}


def test_band_series_draws_each_set_as_quantile_lines_with_ind_in_every_chart():
    rows = curve_rows()
    xs, ys, keys = band_series(rows, "psnr", ["ind", "far_set"], GROUPS, threshold=6.39)
    assert keys == ["InD q10", "InD q50", "InD q90", "far_set (far-OOD) q10", "far_set (far-OOD) q50",
                    "far_set (far-OOD) q90", "AES threshold"]
    assert xs[0] == [1, 2, 3] and ys[-1] == [6.39] * 3
    assert ys[4] == [r["q50"] for r in rows if r["set"] == "far_set"]
    assert all(lo <= mid <= hi for lo, mid, hi in zip(ys[3], ys[4], ys[5]))
    _, _, overview = band_series(rows, "psnr", ["ind", "near_set", "far_set"], GROUPS, ood_bands=("q50",))
    assert overview == ["InD q10", "InD q50", "InD q90", "near_set (near-OOD) q50", "far_set (far-OOD) q50"]


def grid_rows(n=3):
    g = torch.Generator().manual_seed(1)
    return [{"id": f"s{k}", "pred": k, "label": k if k < 2 else -1, "score": -23.4 - k,
             "input": torch.rand(1, 8, 8, generator=g), "synthesis": torch.rand(1, 8, 8, generator=g),
             "reference": torch.rand(1, 8, 8, generator=g)} for k in range(n)]


def image_rows(fig):
    """The grid's row labels (the y labels of the first column's panels)."""
    return [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel() and ax.get_images()
            and ax.get_subplotspec().colspan.start == 0]


def test_reconstruction_grid_names_classes_labels_the_score_and_has_a_colour_bar():
    names = ["T-shirt/top", "Trouser", "Pullover"]
    fig = reconstruction_figure("ind", grid_rows(), "psnr", "input", names)
    # With reference=input the reference IS the input: no row repeats it.
    assert image_rows(fig) == ["input", "guided\nsynthesis", "|synthesis -\ninput|"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "pred T-shirt/top\ntrue T-shirt/top\n-PSNR = -23.4 dB"
    assert titles[2] == "pred Pullover\n-PSNR = -25.4 dB"  # an OOD sample has no true class
    (bar,) = [ax for ax in fig.axes if not ax.get_subplotspec()]  # the colour bar's own axes
    assert "mean over channels" in bar.get_ylabel()
    heat = [ax.get_images()[0] for ax in fig.axes if ax.get_ylabel().startswith("|synthesis")]
    assert heat[0].get_clim()[1] == pytest.approx(max(float((r["synthesis"] - r["reference"]).abs().max())
                                                      for r in grid_rows()))  # one scale for every sample
    unguided = reconstruction_figure("ind", grid_rows(), "l2", "unguided")
    assert image_rows(unguided) == ["input", "guided\nsynthesis", "unguided\nreconstruction",
                                    "|synthesis -\nreconstruction|"]
    assert [ax.get_title() for ax in unguided.axes if ax.get_title()][0] == "pred 0\ntrue 0\nL2 = -23.4"


def test_histogram_title_names_the_distance_and_the_axis_its_unit():
    by_set = {"far_set": [1.0, 2.0, 3.0], "ind": [0.0, 0.5, 1.0], "near_set": [0.5, 1.0, 1.5]}
    fig = histogram_figure(by_set, "diffguard", describe_column("diffguard", "psnr", "unguided"), GROUPS)
    (ax,) = fig.axes
    assert ax.get_title().startswith("diffguard (test split)\nDiffGuard's score, the values of diffguard/psnr: "
                                     "minus the PSNR")
    assert "unguided reconstruction" in ax.get_title()
    assert ax.get_xlabel() == "diffguard score (dB, negated: -30 is a PSNR of 30 dB; higher = more OOD)"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["InD", "near_set (near-OOD)", "far_set (far-OOD)"]
    ind_patch = ax.get_legend_handles_labels()[0][0]
    assert ind_patch.get_fill() and not ax.get_legend_handles_labels()[0][1].get_fill()  # InD filled, OOD outlined


def test_benchmarks_name_their_classes_in_label_order(benchmark):
    from diffguard_pl.data import build_benchmark

    assert benchmark.class_names == ["0", "1", "2", "3", "4", "5"]
    shifted = build_benchmark(DataConfig(ind_classes=[3, 4, 5, 6, 7, 8], near_ood_classes=[0, 1, 2, 9]))
    assert shifted.class_names == ["3", "4", "5", "6", "7", "8"]  # label k is digit ind_classes[k]


def test_fashion_class_names_follow_ind_classes():
    from diffguard_pl.data import fashion

    if not all((fashion.DEBIAN_DIR / f"{stem}.gz").is_file() for stem in fashion.IDX_FILES.values()):
        pytest.skip(f"Fashion-MNIST is not in {fashion.DEBIAN_DIR}")
    bench = fashion.build_fashion_benchmark(DataConfig(benchmark="fashion", ind_classes=[1, 3], near_ood_classes=[0]))
    assert bench.class_names == ["Trouser", "Dress"]
