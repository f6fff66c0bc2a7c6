"""Figure helpers shared by the stages that draw: a headless backend and atomic, reproducible PNG + PDF files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from workflow_scripts.core.common import save_text, write_atomically

FORMATS = ("png", "pdf")
# No creation dates or software versions in the files: the same figure gives the same bytes.
METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


def save_figure(fig, stem: str | Path, dpi: int = 130, formats=FORMATS) -> list[Path]:
    """Write fig as <stem>.png and <stem>.pdf (each atomically) and close it."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            write_atomically(
                path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, metadata=METADATA[fmt], bbox_inches="tight")
            )
            written.append(path)
    finally:
        plt.close(fig)
    return written


def message_figure(text: str, figsize=(6, 2)):
    """A figure that only says why there is nothing to plot."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def show_image(ax, image, title: str | None = None, fontsize: float = 7) -> None:
    """A (c, h, w) image in [-1, 1] (grayscale if c == 1), without axes."""
    import numpy as np

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    elif image.ndim == 3:
        ax.imshow(((np.transpose(image, (1, 2, 0)) + 1) / 2).clip(0, 1), interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


# ------------------------------------------------------------------------------------------- tables as HTML
def markdown_to_html(markdown: str) -> str:
    """The Markdown the table stages write (pipe tables and plain paragraphs) as an HTML fragment."""
    import html

    out, table = [], []

    def cells(row: str) -> list[str]:
        return [html.escape(c.strip()) for c in row.strip().strip("|").split("|")]

    def flush():
        rows = [r for r in table if not all(set(c) <= set("-: ") for c in cells(r))]  # drop the |---| line
        if rows:
            header, *body = rows
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{c}</th>" for c in cells(header))
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(r)) + "</tr>" for r in body)
                + "</tbody></table>"
            )
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line.strip())}</p>")
    flush()
    return "\n".join(out)


def html_page(title: str, body: str, caption: str = "") -> str:
    """A small self-contained HTML page (how the report shows a table)."""
    import html

    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;font-size:13px;margin:1em}table{border-collapse:collapse;margin:0.5em 0}"
        "th,td{border:1px solid #ccc;padding:3px 6px}td{text-align:right}td:first-child{text-align:left}"
        "th{background:#f3f3f3}</style></head><body><h3>"
        + html.escape(title)
        + "</h3>"
        + (f"<p>{html.escape(caption)}</p>" if caption else "")
        + "\n"
        + body
        + "\n</body></html>\n"
    )


def save_table(frame, markdown: str, stem: str | Path, title: str) -> None:
    """A table as <stem>.csv (the data), <stem>.md (for README / terminals) and <stem>.html (for the report)."""
    stem = Path(stem)
    save_text(frame.to_csv(index=False), stem.with_suffix(".csv"))
    save_text(markdown, stem.with_suffix(".md"))
    save_text(html_page(title, markdown_to_html(markdown)), stem.with_suffix(".html"))
