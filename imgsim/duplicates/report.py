"""The files `imgsim duplicates` writes: JSON lines, CSV and a static HTML page, each atomically.

- `duplicates.jsonl`: one group a line, `{"group", "keep", "reason", "exact", "members": [{"path",
  "distance", "exact", "id"}]}` (the kept image first; distances are to it).
- `duplicates.csv`: one member a row: `path, group, keep` (true for the one to keep), `distance`,
  `exact`, `reason` (the group's).
- `duplicates.html`: the groups with thumbnails embedded as data: URIs, so the one file opens
  offline and can be mailed or archived; at most `max_groups` groups are drawn (all of them are in
  the JSONL and CSV), the page says so.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imgsim.config import DEFAULTS
from imgsim.duplicates.groups import Group
from imgsim.io.atomic import atomic_write_bytes

THUMBNAIL_SIDE = 160
FILES = ("duplicates.jsonl", "duplicates.csv", "duplicates.html")


def write_jsonl(groups: Sequence[Group], path: str | os.PathLike[str]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(g.to_json()) + "\n" for g in groups).encode())


def write_csv(groups: Sequence[Group], path: str | os.PathLike[str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "group", "keep", "distance", "exact", "reason"])
    for g in groups:
        for m in g.members:
            writer.writerow(
                [m.path, g.group, str(m.path == g.keep).lower(), m.distance, str(m.exact).lower(), g.reason]
            )
    atomic_write_bytes(path, buf.getvalue().encode())


def thumbnail_data_uri(path: str, side: int = THUMBNAIL_SIDE) -> str | None:
    """A small JPEG of the image at `path` as a data: URI, or None if it cannot be read."""
    from imgsim.data.decode import DecodeError, open_image, to_mode
    from imgsim.data.sources import read_bytes

    try:
        img = to_mode(open_image(read_bytes(path), draft_size=side), 3)
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    except (OSError, DecodeError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7fb;color:#161a2b}
header{padding:20px 28px;background:#fff;border-bottom:1px solid #e4e7ee}
h1{font-size:1.3rem;margin:0 0 6px}
.summary{color:#667085;font-size:.9rem;margin:0}
main{padding:20px 28px;display:grid;gap:18px}
.group{background:#fff;border:1px solid #e4e7ee;border-radius:12px;padding:14px 16px}
.group h2{font-size:1rem;margin:0 0 4px}
.reason{color:#667085;font-size:.85rem;margin:0 0 10px}
.members{display:flex;flex-wrap:wrap;gap:12px;list-style:none;margin:0;padding:0}
.member{width:170px;font-size:.78rem}
.member img,.member .missing{width:160px;height:160px;object-fit:contain;background:#eef0f6;border-radius:8px;
  border:3px solid transparent;display:block}
.member.keep img{border-color:#16a34a}
.member .missing{display:grid;place-items:center;color:#98a2b3}
.path{word-break:break-all;margin:4px 0 2px}
.badge{display:inline-block;border-radius:999px;padding:0 7px;margin-right:4px;font-weight:600}
.badge.keep{background:#dcfce7;color:#166534}.badge.exact{background:#eef0ff;color:#4f46e5}
.more{color:#667085}
"""


def render_html(
    groups: Sequence[Group],
    summary: dict[str, Any],
    max_groups: int = DEFAULTS.duplicates.html_groups,
    thumbnail: Callable[[str], str | None] = thumbnail_data_uri,
) -> str:
    """The static page: a summary, then each group's images (the kept one outlined) with distances."""
    esc = html.escape
    shown = groups[:max_groups]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>imgsim duplicates: {len(groups)} groups</title><style>{_CSS}</style></head><body>",
        "<header><h1>Duplicate groups</h1>",
        f"<p class='summary' id='summary'>{len(groups):,} groups, {summary['images_in_groups']:,} images in groups "
        f"({summary['exact_groups']:,} of byte-identical files) among {summary['images']:,} indexed; "
        f"threshold {summary['threshold']:.6g} ({esc(str(summary['threshold_source']))}).</p>",
    ]
    if len(shown) < len(groups):
        parts.append(
            f"<p class='summary more'>Showing the first {len(shown):,} groups; duplicates.jsonl and "
            "duplicates.csv list them all.</p>"
        )
    parts.append("</header><main>")
    for g in shown:
        kind = "byte-identical files" if g.exact else f"{len(g.members)} images"
        parts.append(f"<section class='group' id='group-{g.group}' data-group='{g.group}'>")
        parts.append(f"<h2>Group {g.group} · {kind}</h2>")
        parts.append(
            f"<p class='reason'>Keep <b>{esc(Path(g.keep).name)}</b>: {esc(g.reason)}</p><ul class='members'>"
        )
        for m in g.members:
            keep = m.path == g.keep
            uri = thumbnail(m.path)
            picture = (
                f"<img src='{uri}' alt='{esc(Path(m.path).name)}' loading='lazy'>"
                if uri
                else "<div class='missing'>unreadable</div>"
            )
            badges = ("<span class='badge keep'>keep</span>" if keep else "") + (
                "<span class='badge exact'>exact</span>" if m.exact else ""
            )
            parts.append(
                f"<li class='member{' keep' if keep else ''}'>{picture}"
                f"<div class='path' title='{esc(m.path)}'>{esc(m.path)}</div>"
                f"<div>{badges}distance {m.distance:.4f}</div></li>"
            )
        parts.append("</ul></section>")
    if not groups:
        parts.append("<p class='summary'>No duplicates found.</p>")
    parts.append("</main></body></html>\n")
    return "".join(parts)


def write_reports(
    groups: Sequence[Group],
    summary: dict[str, Any],
    out: str | os.PathLike[str],
    max_groups: int = DEFAULTS.duplicates.html_groups,
) -> dict[str, str]:
    """Write the three files into `out` (created if needed); their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, csv_path, page = (out / name for name in FILES)
    write_jsonl(groups, jsonl)
    write_csv(groups, csv_path)
    atomic_write_bytes(page, render_html(groups, summary, max_groups).encode())
    return {"jsonl": str(jsonl), "csv": str(csv_path), "html": str(page)}
