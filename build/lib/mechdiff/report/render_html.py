"""The report's blocks (:func:`mechdiff.report.document.document`) as one self-contained HTML page: its style
sheet, verdict cards coloured by label, tables with intervals, figures embedded as data URIs."""

from __future__ import annotations

import base64
import html

from mechdiff.report.document import FIGS
from mechdiff.report.formatting import Est

#: verdict label -> CSS class of its card (colour)
LABEL_CLASS = {"policy-like": "policy", "rewiring-like": "rewiring", "mixed": "mixed", "no difference": "same",
               "difference in a null pair": "fault", "inconclusive": "fault"}

#: the page's style sheet (embedded in the page's <head>)
CSS = """
:root{--fg:#1d2125;--muted:#5f6b76;--line:#d5dae0;--bg2:#f4f6f8}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
max-width:1200px;margin:24px auto;padding:0 24px}
h1{font-size:1.7em;margin:.2em 0 .3em}h2{font-size:1.3em;margin:1.8em 0 .5em;border-bottom:1px solid var(--line);
padding-bottom:.2em}h3{font-size:1.05em;margin:1.2em 0 .4em}
.lead{color:var(--muted);margin:0 0 1.2em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:16px}
.verdict-card{border:1px solid var(--line);border-top:6px solid var(--c);border-radius:8px;padding:12px 16px;
background:#fff;--c:#7a8793}
.verdict-card.policy{--c:#2f6fb0}.verdict-card.rewiring{--c:#c8702a}.verdict-card.mixed{--c:#7d5bb5}
.verdict-card.same{--c:#3f8f4e}.verdict-card.fault{--c:#b8322a}
.verdict-card h3{margin:0;font-size:1.15em;display:flex;gap:.5em;align-items:baseline;flex-wrap:wrap}
.verdict-card .domain{color:var(--muted);font-weight:normal;font-size:.85em}
.label{display:inline-block;padding:1px 10px;border-radius:12px;background:var(--c);color:#fff;font-weight:600;
font-size:.9em;margin:.5em 0 .2em}
.answer{font-size:1.02em;margin:.4em 0 .8em}
.nums{margin:0;display:grid;gap:10px}
.nums dt{font-weight:600;font-size:.85em;text-transform:uppercase;letter-spacing:.03em;color:var(--muted)}
.nums dd{margin:0}.nums .v{font-size:1.3em;font-weight:600}
.reads{display:inline-block;font-size:.8em;border:1px solid var(--c);color:var(--c);border-radius:10px;padding:0 7px;
margin-left:.4em;vertical-align:middle}
.note,.rule{color:var(--muted);font-size:.85em}
.v,.ci{font-variant-numeric:tabular-nums}.ci{color:var(--muted);white-space:nowrap}
table{border-collapse:collapse;width:100%;font-size:14px;margin:.4em 0 1em}
th{text-align:left;font-weight:600;background:var(--bg2);vertical-align:bottom}
td,th{border-bottom:1px solid var(--line);padding:5px 8px;vertical-align:top;overflow-wrap:break-word}
table.kv td{overflow-wrap:anywhere}
td .note{display:block}
table.kv td:first-child{color:var(--muted);white-space:nowrap;width:12em}
details{border:1px solid var(--line);border-radius:6px;padding:6px 14px;margin:1em 0}
summary{cursor:pointer;font-weight:600}
figure{margin:1em 0}img{max-width:100%;height:auto;display:block}
"""


def html_cell(c) -> str:
    """A table cell as HTML: an :class:`mechdiff.report.formatting.Est` as value, interval and note spans (the
    interval and note in muted type), anything else escaped text."""
    if isinstance(c, Est):
        parts = [f"<span class='v'>{html.escape(c.value)}</span>"]
        if c.ci:
            parts.append(f" <span class='ci'>{html.escape(c.ci)}</span>")
        if c.note:
            parts.append(f"<span class='note'>{html.escape(c.note)}</span>")
        return "".join(parts)
    return html.escape(str(c))


def _html_card(c: dict) -> str:
    cls = LABEL_CLASS.get(c["label"], "fault")
    out = [f"<article class='verdict-card {cls}' id='card-{html.escape(c['pair'])}'>",
           f"<h3>{html.escape(c['pair'])} <span class='domain'>{html.escape(c['domain'])} pair</span></h3>",
           f"<span class='label'>{html.escape(c['label'])}</span>",
           f"<p class='answer'>{html.escape(c['sentence'])}</p><dl class='nums'>"]
    for n in c["numbers"]:
        reads = f"<span class='reads'>reads {html.escape(n['reads'])}</span>" if n["reads"] else ""
        e = n["est"]
        out.append(f"<div><dt>{html.escape(n['title'])}</dt><dd><span class='v'>{html.escape(e.value)}</span>"
                   + (f" <span class='ci'>{html.escape(e.ci)}</span>" if e.ci else "")
                   + (f" <span class='note'>{html.escape(e.note)}</span>" if e.note else "") + reads
                   + f"<div class='note'>{html.escape(n['detail'])}</div>"
                   + f"<div class='rule'>{html.escape(n['rule'])}</div></dd></div>")
    out.append("</dl></article>")
    return "".join(out)


def _html_blocks(blocks: list[tuple], fig_bytes: dict) -> list[str]:
    out = []
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{html.escape(body[0])}</{kind}>")
        elif kind == "lead":
            out.append(f"<p class='lead'>{html.escape(body[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in body[0]) + "</ul>")
        elif kind == "table":
            head, *rows = body[0]
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead>"
                       "<tbody>" + "".join("<tr>" + "".join(f"<td>{html_cell(c)}</td>" for c in r) + "</tr>"
                                           for r in rows) + "</tbody></table>")
        elif kind == "kv":
            out.append("<table class='kv'>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                                      for k, v in body[0]) + "</table>")
        elif kind == "cards":
            out.append("<section class='cards'>" + "".join(_html_card(c) for c in body[0]) + "</section>")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(body[0])}</summary>")
            out.extend(_html_blocks(body[1], fig_bytes))
            out.append("</details>")
        elif kind == "img":
            data = base64.b64encode(fig_bytes[body[0]]).decode("ascii")
            out.append(f"<figure><img alt='Figure {body[0]}: {html.escape(FIGS[body[0]])}' "
                       f"src='data:image/png;base64,{data}'></figure>")
    return out


def to_html(blocks: list[tuple], fig_bytes: dict) -> str:
    """A self-contained page: the figures (``fig_bytes``: figure letter -> PNG bytes) are embedded as base64 data
    URIs, no network needed."""
    head = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>mechdiff report</title><style>{CSS}</style></head><body>")
    return "\n".join([head] + _html_blocks(blocks, fig_bytes) + ["</body></html>"])
