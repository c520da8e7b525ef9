"""Build one self-contained HTML report (plus a Markdown twin) from headings, text, tables and figures.

>>> report = Report("Data description")
>>> report.heading("Labels")
>>> report.table(counts, caption="Positives per split", name="label_counts")
>>> report.figure(fig, "label_counts", caption="Positive images per label")
>>> report.write("runs/describe")   # report.html, report.md, label_counts.png, label_counts.csv

Figures are embedded in the HTML as base64 PNG (the page works alone, e.g. as an e-mail attachment or CI
artifact) and also written as PNG files next to it, which the Markdown version links to. All text is
HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from cxrkit import __version__
from cxrkit.reporting.plots import to_png

FloatFormat = str | Callable[[float], str]
CALLOUT_KINDS = ("ok", "info", "warning", "error")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2125;
       max-width: 1100px; margin: 2rem auto; padding: 0 1.5rem; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #d8dde3; padding-bottom: .2rem;
     margin-top: 2.2rem; } h3 { margin-top: 1.5rem; }
.meta { color: #6a737d; font-size: .85rem; } nav ol { columns: 2; font-size: .9rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .88rem; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3rem; }
th, td { border: 1px solid #d8dde3; padding: .25rem .6rem; } th { background: #f3f5f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
.table-wrap { overflow-x: auto; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eef0f2; }
figcaption { color: #4a535c; font-size: .88rem; }
.callout { border-left: 5px solid; border-radius: 4px; padding: .6rem .9rem; margin: .8rem 0; }
.callout.ok { border-color: #2da44e; background: #eefbf1; }
.callout.info { border-color: #0969da; background: #eef5ff; }
.callout.warning { border-color: #d4a72c; background: #fff8e1; }
.callout.error { border-color: #cf222e; background: #ffeef0; }
"""


@dataclass(frozen=True)
class _Block:
    html: str
    markdown: str


class Report:
    """An ordered list of blocks rendered to ``report.html`` and ``report.md`` by :meth:`write`."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self._blocks: list[_Block] = []
        self._files: dict[str, bytes] = {}
        self._anchors: list[tuple[str, str]] = []

    def heading(self, text: str, level: int = 2) -> None:
        """Section heading (level 2 headings also go into the table of contents)."""
        if not 2 <= level <= 4:
            raise ValueError(f"heading level must be 2, 3 or 4 (1 is the report title), got {level}")
        anchor = f"s{len(self._blocks)}-{_slug(text)}"
        if level == 2:
            self._anchors.append((anchor, text))
        self._add(f'<h{level} id="{anchor}">{_esc(text)}</h{level}>', f"{'#' * level} {_md_text(text)}")

    def paragraph(self, text: str) -> None:
        self._add(f"<p>{_esc(text)}</p>", _md_text(text))

    def callout(self, text: str, kind: str = "ok") -> None:
        """A highlighted box: ``ok`` (check passed), ``info``, ``warning`` or ``error``."""
        if kind not in CALLOUT_KINDS:
            raise ValueError(f"callout kind must be one of {CALLOUT_KINDS}, got {kind!r}")
        self._add(
            f'<div class="callout {kind}"><strong>{kind.upper()}</strong> {_esc(text)}</div>',
            f"> **{kind.upper()}** {_md_text(text)}",
        )

    def table(
        self,
        df: pd.DataFrame,
        caption: str | None = None,
        *,
        name: str | None = None,
        float_format: FloatFormat = "{:,.3g}",
        index: bool = False,
        na_rep: str = "",
    ) -> None:
        """A table; with ``name`` it is also written as ``<name>.csv`` (full precision) by :meth:`write`."""
        if name is not None:
            self._reserve(f"{name}.csv", df.to_csv(index=index).encode())
        cells = _format_cells(df.reset_index() if index else df, float_format, na_rep)
        numeric = [
            pd.api.types.is_numeric_dtype(dtype) for dtype in (df.reset_index() if index else df).dtypes
        ]
        self._add(_html_table(cells, numeric, caption), _md_table(cells, caption))

    def attach(self, df: pd.DataFrame, name: str, *, index: bool = False) -> None:
        """Write ``df`` as ``<name>.csv`` next to the report without showing it (data behind a figure)."""
        self._reserve(f"{name}.csv", df.to_csv(index=index).encode())

    def figure(self, fig: Figure, name: str, caption: str | None = None, *, dpi: int | None = None) -> None:
        """A matplotlib figure, embedded as base64 PNG and written as ``<name>.png``."""
        png = to_png(fig) if dpi is None else to_png(fig, dpi)
        self._reserve(f"{name}.png", png)
        encoded = base64.b64encode(png).decode("ascii")
        alt = _esc(caption or name)
        caption_html = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        markdown = f"![{_md_text(caption or name)}]({name}.png)"
        if caption:
            markdown += f"\n\n*{_md_text(caption)}*"
        self._add(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{alt}">{caption_html}</figure>',
            markdown,
        )

    def write(self, out_dir: str | Path) -> Path:
        """Write ``report.html``, ``report.md`` and the PNG/CSV files to ``out_dir``; return the HTML path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for file_name, content in self._files.items():
            (out_dir / file_name).write_bytes(content)
        (out_dir / "report.md").write_text(self.markdown(), encoding="utf-8")
        path = out_dir / "report.html"
        path.write_text(self.html(), encoding="utf-8")
        return path

    def html(self) -> str:
        """The whole page as one HTML string."""
        toc = ""
        if len(self._anchors) > 2:
            items = "".join(
                f'<li><a href="#{anchor}">{_esc(text)}</a></li>' for anchor, text in self._anchors
            )
            toc = f"<nav><ol>{items}</ol></nav>"
        subtitle = f"<p>{_esc(self.subtitle)}</p>" if self.subtitle else ""
        body = "\n".join(block.html for block in self._blocks)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f'<h1>{_esc(self.title)}</h1>\n{subtitle}<p class="meta">{_esc(_stamp())}</p>\n{toc}\n'
            f"{body}\n</body>\n</html>\n"
        )

    def markdown(self) -> str:
        """The same content as Markdown (figures link to the PNG files written next to it)."""
        parts = [f"# {_md_text(self.title)}", *([_md_text(self.subtitle)] if self.subtitle else []), _stamp()]
        parts += [block.markdown for block in self._blocks]
        return "\n\n".join(parts) + "\n"

    def _add(self, html_text: str, markdown: str) -> None:
        self._blocks.append(_Block(html_text, markdown))

    def _reserve(self, file_name: str, content: bytes) -> None:
        if not _NAME.match(file_name) or file_name.startswith("report."):
            raise ValueError(
                f"report file name {file_name!r} must be letters, digits, '_', '-', '.' "
                "and not start with 'report.'"
            )
        if file_name in self._files:
            raise ValueError(f"report already has a file named {file_name!r}")
        self._files[file_name] = content


def _format_cells(df: pd.DataFrame, float_format: FloatFormat, na_rep: str) -> list[list[str]]:
    formatter = float_format.format if isinstance(float_format, str) else float_format
    header = [str(column) for column in df.columns]

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
            return na_rep
        if isinstance(value, float):
            return formatter(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    rows = [[cell(value) for value in row] for row in df.astype(object).itertuples(index=False)]
    return [header, *rows]


def _html_table(cells: list[list[str]], numeric: list[bool], caption: str | None) -> str:
    header, *rows = cells
    head = "".join(f"<th>{_esc(text)}</th>" for text in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if num else ''}>{_esc(text)}</td>"
            for text, num in zip(row, numeric, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    caption_html = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return (
        f'<div class="table-wrap"><table>{caption_html}<thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _md_table(cells: list[list[str]], caption: str | None) -> str:
    header, *rows = cells
    lines = [f"**{_md_text(caption)}**", ""] if caption else []
    lines.append("| " + " | ".join(_md_cell(text) for text in header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(_md_cell(text) for text in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def _md_text(text: str) -> str:
    return html.escape(str(text), quote=False)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "section"


def _stamp() -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"Generated {now} by cxrkit {__version__}"
