"""HTML pieces of the report: escaping, tables (optionally sortable), figures, notes, the page's CSS and scripts.

All text that comes from datasets, configs or file names goes through :func:`esc` (tables, notes) or
:func:`fig_html` (text inside figure JSON): the one escaping rule of the report.
"""

from __future__ import annotations

import html
import json
from typing import Any, Callable

import numpy as np
import pandas as pd

__all__ = ["esc", "table_html", "fig_html", "section", "note", "json_pre", "CSS", "ERROR_HOOK", "SORT_JS"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1f2328}
h1{margin-bottom:4px} h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
table.tbl{border-collapse:collapse;font-size:13px;margin:8px 0} .tbl th,.tbl td{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
.tbl th{background:#f6f8fa} .tbl td.n{text-align:right;white-space:nowrap}
table.sortable th{cursor:pointer} table.sortable th[data-sort=asc]::after{content:" ▲"}
table.sortable th[data-sort=desc]::after{content:" ▼"}
td.pos{color:#1a7f37;font-weight:600} td.neg{color:#cf222e;font-weight:600} td.zero{color:#57606a}
td.unresolved{color:#8c959f;font-style:italic}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;margin:6px 0;border-radius:4px}
#kalm-errors:empty{display:none} #kalm-errors{background:#ffebe9;border:1px solid #cf222e;padding:6px}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px;max-height:420px} .small{font-size:12px;color:#57606a}
"""

# Collects script errors visibly in the page (and lets the browser test check there are none).
ERROR_HOOK = """<script>window.kalmErrors=[];window.onerror=function(m,s,l,c,e){window.kalmErrors.push(String(m));
var d=document.getElementById('kalm-errors');if(d){var p=document.createElement('div');p.className='kalm-error';
p.textContent='script error: '+m+' ('+s+':'+l+')';d.appendChild(p);}return false;};</script>"""

# Click a header of a table.sortable to sort its rows (again: the other way). Hand-written, not a library: the
# report opens offline from file:// (no CDN) and these few lines are all it needs. Numeric cells carry their
# raw value in data-v; empty values sort last either way.
SORT_JS = """<script>document.addEventListener('click',function(e){
var th=e.target.closest&&e.target.closest('table.sortable th');if(!th)return;
var body=th.closest('table').tBodies[0],i=th.cellIndex,asc=th.getAttribute('data-sort')!=='asc';
Array.prototype.forEach.call(th.parentNode.cells,function(c){c.removeAttribute('data-sort');});
th.setAttribute('data-sort',asc?'asc':'desc');
function key(tr){var c=tr.cells[i],v=c.getAttribute('data-v');
return v===null?c.textContent:(v===''?null:parseFloat(v));}
var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=key(a),y=key(b);if(x===null||x==='')return y===null||y===''?0:1;
if(y===null||y==='')return -1;var d=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
return asc?d:-d;});rows.forEach(function(r){body.appendChild(r);});});</script>"""


def esc(x: Any) -> str:
    """HTML-escape any value's text."""
    return html.escape("" if x is None else str(x), quote=True)


def _missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # lists, dicts: never missing
        return False


def _fmt(v: Any) -> str:
    if _missing(v):
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return esc(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and not _missing(v)


def table_html(df: pd.DataFrame, *, signed: tuple[str, ...] = (), cls: str = "tbl", sortable: bool = False,
               formats: dict[str, Callable[[Any], str]] | None = None,
               row_class: Callable[[pd.Series], str] | None = None) -> str:
    """An escaped HTML table. Columns in ``signed`` get green/red/grey by sign; ``formats`` maps a column to a
    function giving a value's text; ``row_class`` gives a CSS class for a row's signed cells (e.g.
    "unresolved"). ``sortable``: click a header to sort (numeric cells carry their raw value)."""
    if df is None or df.empty:
        return "<p class='note'>(empty)</p>"
    formats = formats or {}
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        special = row_class(row) if row_class else ""
        cells = []
        for c in df.columns:
            v = row[c]
            raw = f" data-v='{float(v)!r}'" if sortable and _is_number(v) else (" data-v=''" if sortable and _missing(v)
                                                                        else "")
            if c in signed and _is_number(v):
                k = special or ("pos" if v > 0 else ("neg" if v < 0 else "zero"))
                cells.append(f"<td class='{k} n'{raw}>{v:+.2f}</td>")
            else:
                text = esc(formats[c](v)) if c in formats and not _missing(v) else _fmt(v)
                cells.append(f"<td class='n'{raw}>{text}</td>" if _is_number(v) else f"<td{raw}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = f"{cls} sortable" if sortable else cls
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def fig_html(fig, div_id: str) -> str:
    """A figure as a div + a Plotly.newPlot call. The figure JSON has every '<' escaped as \\u003c so text
    from datasets can never close the script tag (hand-written because plotly's to_html does not do this)."""
    if fig is None:
        return ""
    spec = fig.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (f"<div id='{div_id}' class='kalm-fig'></div>\n<script>(function(){{var f={spec};"
            f"Plotly.newPlot('{div_id}', f.data, f.layout, {{responsive: true, displaylogo: false}});}})();</script>")


def section(title: str, body: str, sid: str) -> str:
    """One report section with its heading."""
    return f"<section id='{sid}'><h2>{esc(title)}</h2>\n{body}\n</section>"


def note(text: str) -> str:
    """A visible note (what is missing, what is not compared and why)."""
    return f"<div class='note'>{esc(text)}</div>"


def json_pre(obj: Any) -> str:
    """A JSON value, indented and escaped, in a <pre>."""
    return f"<pre>{esc(json.dumps(obj, indent=1, ensure_ascii=False, default=str))}</pre>"
