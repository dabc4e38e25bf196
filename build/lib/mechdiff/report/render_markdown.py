"""The report's blocks (:func:`mechdiff.report.document.document`) as Markdown."""

from __future__ import annotations

import html


def md_cell(c) -> str:
    """A table cell (a string or :class:`mechdiff.report.formatting.Est`) as Markdown text, ``|`` escaped."""
    return str(c).replace("|", "\\|")


def _md_blocks(blocks: list[tuple], fig_paths: dict) -> list[str]:
    out = []
    for kind, *body in blocks:
        if kind == "h1":
            out.append(f"# {body[0]}\n")
        elif kind == "h2":
            out.append(f"## {body[0]}\n")
        elif kind == "h3":
            out.append(f"### {body[0]}\n")
        elif kind in ("p", "lead"):
            out.append(body[0] + "\n")
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in body[0]) + "\n")
        elif kind == "table":
            head, *rows = body[0]
            out.append("\n".join(["| " + " | ".join(map(md_cell, head)) + " |", "|" + "---|" * len(head)]
                                 + ["| " + " | ".join(map(md_cell, r)) + " |" for r in rows]) + "\n")
        elif kind == "kv":
            out.append("\n".join(["| key | value |", "|---|---|"]
                                 + [f"| {md_cell(k)} | {md_cell(v)} |" for k, v in body[0]]) + "\n")
        elif kind == "cards":
            for c in body[0]:
                out.append(f"### {c['pair']} ({c['domain']}): {c['label']}\n")
                out.append(f"**{c['sentence']}**\n")
                out.append("\n".join(
                    f"- **{n['title']}**" + (f" (reads {n['reads']})" if n["reads"] else "") + f": {n['est']}. "
                    f"{n['detail'][:1].upper()}{n['detail'][1:]}; {n['rule']}." for n in c["numbers"]) + "\n")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(body[0])}</summary>\n")
            out.extend(_md_blocks(body[1], fig_paths))
            out.append("</details>\n")
        elif kind == "img":
            out.append(f"![Figure {body[0]}]({fig_paths[body[0]]})\n")
    return out


def to_markdown(blocks: list[tuple], fig_paths: dict) -> str:
    """The report as Markdown; ``fig_paths``: figure letter -> the path the Markdown links (relative to it)."""
    return "\n".join(_md_blocks(blocks, fig_paths))
