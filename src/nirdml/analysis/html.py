"""A tiny self-contained HTML writer: escaped text, tables, and PNGs embedded as data URIs
(with a link to the PNG file written beside the page)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #1d1d1f; background: #f6f6f7; }
main { max-width: 1240px; margin: 0 auto; padding: 18px 28px 40px; background: #fff; }
h1 { font-size: 24px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 30px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p, li { font-size: 14px; line-height: 1.45; }
.meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: right; }
th { background: #f0f0f2; }
td.l, th.l { text-align: left; }
figure { margin: 10px 0 16px; }
figure img { max-width: 100%; border: 1px solid #e4e4e4; }
figcaption { font-size: 12.5px; color: #444; margin-top: 3px; }
.note { background: #fff8e0; border-left: 3px solid #e0b000; padding: 6px 10px; font-size: 13px; }
nav a { margin-right: 12px; font-size: 13px; }
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return esc(value)


def table(
    header: Sequence[str], rows: Sequence[Sequence[object]], text: Sequence[int] = (0,)
) -> str:
    """An HTML table; the columns listed in ``text`` are left-aligned text, the others
    right-aligned numbers."""

    def cell(tag: str, i: int, v: object) -> str:
        cls = ' class="l"' if i in text else ""
        return f"<{tag}{cls}>{fmt(v) if tag == 'td' else esc(v)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(name: str, png: bytes, caption: str, alt: str) -> str:
    """An embedded PNG; ``data-file`` names the copy written beside the page."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" data-file="{esc(name)}" '
        f'alt="{esc(alt)}"><figcaption>{caption} <a href="{esc(name)}">{esc(name)}</a>'
        "</figcaption></figure>"
    )


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
