"""The page model (sections of paragraphs, tables, images, collapsible text) and its two renderings: a
self-contained HTML page (plots embedded as data URIs, every text escaped) and a markdown twin."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Any, Union

from kdlm import __version__
from kdlm.report.runs import RunData

# ------------------------------------------------------------------------------------------------ page model
# The page is a list of sections of blocks, rendered twice: to HTML (render_html) and to markdown (render_markdown).
@dataclass
class Paragraph:
    """A line of plain text."""

    text: str


@dataclass
class Table:
    """Cells are already formatted strings; escaping happens when rendering."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric_from: int = 1  # columns from this index on are right-aligned


@dataclass
class Image:
    """A PNG: embedded as a data URI in the HTML, written to ``filename`` beside it for the markdown."""

    filename: str
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Details:
    """Collapsible preformatted text (a full config)."""

    summary: str
    text: str
    language: str = ""


Block = Union[Paragraph, Table, Image, Details]


@dataclass
class Section:
    """One ``<h2>`` of the page with its blocks; ``anchor`` is its id for the navigation links."""

    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{margin:0 0 4px;font-size:26px} h2{margin-top:36px;border-bottom:2px solid #e3e6eb;padding-bottom:4px;font-size:20px}
.meta{color:#5b6475;font-size:13px;margin-bottom:12px} nav a{margin-right:14px;font-size:14px;color:#2451a6}
table{border-collapse:collapse;margin:10px 0 4px;font-size:13px;width:100%} caption{caption-side:bottom;text-align:left;
color:#5b6475;font-size:12px;padding-top:4px} th,td{border:1px solid #d9dde3;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#eef1f5;font-weight:600} tr:nth-child(even) td{background:#fafbfc} td.num{text-align:right;
font-variant-numeric:tabular-nums;white-space:nowrap} td{overflow-wrap:break-word}
.scroll{overflow-x:auto}
figure{margin:14px 0} figure img{max-width:100%;border:1px solid #e3e6eb} figcaption{color:#5b6475;font-size:12px}
details{margin:8px 0} summary{cursor:pointer;color:#2451a6}
pre{background:#f3f4f6;padding:10px;overflow:auto;font-size:12px;max-height:480px}
"""

# Sets data-images-ok on <body> once every image decoded (naturalWidth > 0); the render test reads it.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.every(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-ok", ok ? "true" : "false");
});
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_h(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{_h(h)}</th>" for h in block.headers)
        body = []
        for row in block.rows:
            cells = "".join(f'<td class="num">{_h(c)}</td>' if i >= block.numeric_from else f"<td>{_h(c)}</td>"
                            for i, c in enumerate(row))
            body.append(f"<tr>{cells}</tr>")
        caption = f"<caption>{_h(block.caption)}</caption>" if block.caption else ""
        rows = "".join(body)
        return f'<div class="scroll"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        caption = f"<figcaption>{_h(block.caption)}</figcaption>" if block.caption else ""
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{_h(block.alt)}" '
                f'data-file="{_h(block.filename)}">{caption}</figure>')
    return f"<details><summary>{_h(block.summary)}</summary><pre>{_h(block.text)}</pre></details>"


def render_html(sections: list[Section], runs: list[RunData], generated: str) -> str:
    """The whole page as one string: inline CSS, images as data URIs, no external resource."""
    nav = "".join(f'<a href="#{_h(s.anchor)}">{_h(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h('kdlm report: ' + ', '.join(run.label for run in runs))}</title>",
        f"<style>{CSS}</style></head>", '<body data-images-ok="pending"><main>',
        "<h1>kdlm report</h1>",
        f'<div class="meta">{_h(f"{len(runs)} run(s): " + ", ".join(run.label for run in runs))} · '
        f"{_h(f'generated {generated} by kdlm {__version__}')}</div>",
        f"<nav>{nav}</nav>",
    ]
    for section in sections:
        parts.append(f'<section id="{_h(section.anchor)}"><h2>{_h(section.title)}</h2>')
        parts.extend(_html_block(block) for block in section.blocks)
        parts.append("</section>")
    parts.append(f"</main><script>{SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ").replace("\r", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                 "|" + "|".join("---:" if i >= block.numeric_from else "---" for i in range(len(block.headers))) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        if block.caption:
            lines += ["", f"*{_md_cell(block.caption)}*"]
        return "\n".join(lines)
    if isinstance(block, Image):
        text = f"![{_md_cell(block.alt)}]({block.filename})"
        return text + (f"\n\n*{_md_cell(block.caption)}*" if block.caption else "")
    longest = max((len(m) for m in re.findall(r"`+", block.text)), default=0)
    fence = "`" * max(3, longest + 1)
    return (f"<details><summary>{html.escape(block.summary)}</summary>\n\n{fence}{block.language}\n"
            f"{block.text.rstrip()}\n{fence}\n\n</details>")


def render_markdown(sections: list[Section], runs: list[RunData], generated: str) -> str:
    """The markdown twin: the same sections and tables; images link the PNG files beside it."""
    parts = ["# kdlm report", "",
             f"{len(runs)} run(s): " + ", ".join(f"`{run.label}`" for run in runs)
             + f" · generated {generated} by kdlm {__version__}"]
    for section in sections:
        parts += ["", f"## {section.title}"]
        for block in section.blocks:
            parts += ["", _md_block(block)]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ entry points
