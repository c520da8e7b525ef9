"""The HTML report builder and the shared matplotlib figures."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrkit.reporting import plots
from cxrkit.reporting.html import Report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = '<script>alert("x")</script> & <b>'


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    return Image.open(io.BytesIO(data)).size


def _embedded_pngs(html_text: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    ]


@pytest.fixture
def small_figure():
    return plots.histogram(np.array([1.0, 2.0, 2.0, 3.0, np.nan]), bins=3, xlabel="x", title="t")


def test_report_writes_html_markdown_and_png_files(tmp_path: Path, small_figure) -> None:
    report = Report("My report", subtitle="a subtitle")
    report.heading("Section one")
    report.paragraph("Some text.")
    report.table(
        pd.DataFrame({"label": ["Mass", "Nodule"], "count": [3, 40_000]}), caption="Counts", name="counts"
    )
    report.figure(small_figure, "hist", caption="A histogram")
    report.callout("All good", "ok")
    path = report.write(tmp_path / "out")

    assert path == tmp_path / "out" / "report.html"
    page = path.read_text()
    pngs = _embedded_pngs(page)
    assert len(pngs) == 1
    assert pngs[0] == (tmp_path / "out" / "hist.png").read_bytes()  # embedded and saved copies agree
    width, height = _png_size(pngs[0])
    assert width > 300 and height > 150
    assert "<caption>Counts</caption>" in page and "<td class=num>40,000</td>" in page
    assert 'class="callout ok"' in page and "All good" in page
    assert pd.read_csv(tmp_path / "out" / "counts.csv")["count"].tolist() == [3, 40_000]

    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.startswith("# My report")
    assert "| label | count |" in markdown and "| Nodule | 40,000 |" in markdown
    assert "![A histogram](hist.png)" in markdown


def test_report_escapes_all_text(tmp_path: Path) -> None:
    report = Report(EVIL, subtitle=EVIL)
    report.heading(EVIL)
    report.paragraph(EVIL)
    report.callout(EVIL, "warning")
    report.table(pd.DataFrame({EVIL: [EVIL]}), caption=EVIL)
    page = report.write(tmp_path).read_text()
    assert "<script>" not in page and "<b>" not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;") >= 7
    assert "<script>" not in (tmp_path / "report.md").read_text()


def test_table_formats_floats_missing_values_and_index(tmp_path: Path) -> None:
    frame = pd.DataFrame({"auc": [0.91234, np.nan], "n": [10, 20]}, index=pd.Index(["a", "b"], name="label"))
    report = Report("t")
    report.table(frame, float_format="{:.2f}", index=True, na_rep="n/a")
    page = report.write(tmp_path).read_text()
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    assert rows[0] == "<th>label</th><th>auc</th><th>n</th>"
    assert rows[1] == "<td>a</td><td class=num>0.91</td><td class=num>10</td>"
    assert rows[2] == "<td>b</td><td class=num>n/a</td><td class=num>20</td>"


def test_attach_writes_csv_without_showing_it(tmp_path: Path) -> None:
    report = Report("t")
    report.attach(pd.DataFrame({"secret_column": [1]}), "data")
    report.write(tmp_path)
    assert (tmp_path / "data.csv").exists()
    assert "secret_column" not in (tmp_path / "report.html").read_text()


def test_table_of_contents_links_level_two_headings(tmp_path: Path) -> None:
    report = Report("t")
    for name in ("Alpha", "Beta", "Gamma"):
        report.heading(name)
        report.heading(f"{name} detail", level=3)
    page = report.write(tmp_path).read_text()
    links = re.findall(r'<li><a href="#([^"]+)">([^<]+)</a></li>', page)
    assert [text for _, text in links] == ["Alpha", "Beta", "Gamma"]
    for anchor, _ in links:
        assert f'id="{anchor}"' in page


def test_report_rejects_bad_input(small_figure) -> None:
    report = Report("t")
    report.figure(small_figure, "fig")
    with pytest.raises(ValueError, match=r"already has a file named 'fig\.png'"):
        report.figure(small_figure, "fig")
    with pytest.raises(ValueError, match="must be letters"):
        report.figure(small_figure, "../escape")
    with pytest.raises(ValueError, match="callout kind"):
        report.callout("x", "fine")
    with pytest.raises(ValueError, match="heading level"):
        report.heading("x", level=1)


def _check_png(fig, path: Path) -> tuple[int, int]:
    plots.save_png(fig, path)
    data = path.read_bytes()
    assert len(data) > 1000
    return _png_size(data)


def test_label_counts_bar_has_one_bar_per_label_and_split(tmp_path: Path) -> None:
    counts = pd.DataFrame(
        {"train": [120, 3, 0], "test": [30, 1, 2]}, index=["Effusion", "Pleural Thickening", "Hernia"]
    )
    counts.columns.name = "split"
    fig = plots.label_counts_bar(counts)
    ax = fig.axes[0]
    assert len(ax.patches) == 6
    assert [tick.get_text() for tick in ax.get_yticklabels()] == list(counts.index)
    assert _check_png(fig, tmp_path / "bar.png")[0] > 400
    assert plots.label_counts_bar(counts, log=True).axes[0].get_xscale() == "log"


def test_cooccurrence_heatmap_annotates_counts(tmp_path: Path) -> None:
    matrix = pd.DataFrame([[50, 7], [7, 12]], index=["Mass", "Nodule"], columns=["Mass", "Nodule"])
    fig = plots.cooccurrence_heatmap(matrix)
    texts = sorted(text.get_text() for text in fig.axes[0].texts)
    assert texts == ["12", "50", "7", "7"]
    _check_png(fig, tmp_path / "heat.png")


def test_histogram_groups_and_normalisation(tmp_path: Path) -> None:
    fig = plots.histogram(
        {"train": np.arange(100.0), "test": np.array([5.0, np.nan])}, bins=[0, 50, 100], normalize=True
    )
    ax = fig.axes[0]
    assert ax.get_ylabel() == "% of images"
    assert len(ax.patches) == 2  # one step outline per group
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["train (n=100)", "test (n=1)"]
    _check_png(fig, tmp_path / "hist.png")
    empty = plots.histogram(np.array([np.nan]))
    assert any(text.get_text() == "no values" for text in empty.axes[0].texts)


def test_category_bars_stacks_to_100_percent(tmp_path: Path) -> None:
    table = pd.DataFrame({"PA": [30, 5], "AP": [10, 15]}, index=["train", "test"])
    fig = plots.category_bars(table)
    widths = np.array([patch.get_width() for patch in fig.axes[0].patches]).reshape(2, 2)  # column-major
    np.testing.assert_allclose(widths.sum(axis=0), [100, 100])
    np.testing.assert_allclose(widths[:, 0], [75, 25])
    _check_png(fig, tmp_path / "bars.png")
    grouped = plots.category_bars(table, normalize=False, stacked=False)
    assert sorted(p.get_width() for p in grouped.axes[0].patches) == [5, 10, 15, 30]


def test_image_grid_shows_pixels_on_a_fixed_0_255_scale(tmp_path: Path) -> None:
    gray = np.full((32, 32), 128, dtype=np.uint8)
    fig = plots.image_grid([gray, gray, gray], ["a", "b", "c"], ncols=2)
    assert len([ax for ax in fig.axes if ax.images]) == 3
    _check_png(fig, tmp_path / "grid.png")
    pixels = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    # A constant image must stay mid-grey (not autoscaled to black): most non-white pixels are ~128.
    values, counts = np.unique(pixels[pixels < 250], return_counts=True)
    assert abs(int(values[counts.argmax()]) - 128) <= 2


def test_image_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        plots.image_grid([])
    with pytest.raises(ValueError, match="2 images but 1 titles"):
        plots.image_grid([np.zeros((4, 4), np.uint8)] * 2, ["a"])
    with pytest.raises(ValueError, match="grayscale"):
        plots.image_grid([np.zeros((4, 4, 3), np.uint8)])
