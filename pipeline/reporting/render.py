"""A report as plain data (sections of paragraphs, tables, pictures, preformatted text),
rendered to Markdown and to one self-contained HTML page.

Markdown links each picture as figures/NAME (the report stage writes them there); the HTML
page embeds every picture as a base64 data URI and carries its own small stylesheet, so it
opens from disk, mailed or offline, with nothing else beside it.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

import pandas as pd

FIGURES_DIR = "figures"


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of plain-text items."""

    items: list[str]


@dataclass(frozen=True)
class Table:
    """A table; `name` becomes the HTML element's id (e.g. "results")."""

    frame: pd.DataFrame
    name: str = ""


@dataclass(frozen=True)
class Picture:
    """A PNG picture, saved as figures/`file_name` beside report.md."""

    file_name: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class Preformatted:
    """Monospaced text kept as it is (e.g. a Keras model summary)."""

    text: str
    caption: str = ""


Block = Text | Bullets | Table | Picture | Preformatted


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    title: str
    intro: str
    sections: list[Section]

    def pictures(self) -> list[Picture]:
        """Every picture of the report, in order (file names are unique)."""
        return [block for section in self.sections for block in section.blocks if isinstance(block, Picture)]


def anchor(title: str) -> str:
    """A section title as an HTML id: lowercase words joined by dashes."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


# ---------------------------------------------------------------------------- Markdown


def _markdown_table(frame: pd.DataFrame) -> str:
    shown = frame.astype(object).where(frame.notna(), "")
    return shown.to_markdown(index=False)


def _markdown_block(block: Block) -> str:
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        return _markdown_table(block.frame)
    if isinstance(block, Picture):
        return f"![{block.caption}]({FIGURES_DIR}/{block.file_name})\n\n*{block.caption}*"
    if isinstance(block, Preformatted):
        caption = f"{block.caption}\n\n" if block.caption else ""
        return f"{caption}```text\n{block.text.rstrip()}\n```"
    raise TypeError(f"unknown report block {type(block).__name__}")


def to_markdown(report: Report) -> str:
    """The report as GitHub Markdown; pictures are links to figures/NAME."""
    toc = "\n".join(f"- [{section.title}](#{anchor(section.title)})" for section in report.sections)
    parts = [f"# {report.title}", report.intro, toc]
    for section in report.sections:
        parts.append(f"## {section.title}")
        parts += [_markdown_block(block) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .8em; }
nav ul { columns: 2; }
"""


def data_uri(png: bytes) -> str:
    """PNG bytes as a data: URI, so the page needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Bullets):
        items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
        return f"<ul>{items}</ul>"
    if isinstance(block, Table):
        table = block.frame.to_html(index=False, border=0, na_rep="", escape=True)
        return table.replace("<table", f'<table id="{block.name}"', 1) if block.name else table
    if isinstance(block, Picture):
        caption = html.escape(block.caption)
        return f'<figure><img src="{data_uri(block.png)}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
    if isinstance(block, Preformatted):
        caption = f"<p>{html.escape(block.caption)}</p>" if block.caption else ""
        return f"{caption}<pre>{html.escape(block.text.rstrip())}</pre>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def to_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS, pictures as data URIs)."""
    title = html.escape(report.title)
    toc = "".join(
        f'<li><a href="#{anchor(section.title)}">{html.escape(section.title)}</a></li>' for section in report.sections
    )
    body = [f"<h1>{title}</h1>", f"<p>{html.escape(report.intro)}</p>", f"<nav><ul>{toc}</ul></nav>"]
    for section in report.sections:
        body.append(f'<section id="{anchor(section.title)}"><h2>{html.escape(section.title)}</h2>')
        body += [_html_block(block) for block in section.blocks]
        body.append("</section>")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
