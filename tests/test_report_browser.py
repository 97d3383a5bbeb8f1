"""Real headless Chromium: the explorer's figure in an executed notebook 05's HTML export has data (issue 14.7),
and the report's ranked tables sort when a header is clicked (issue 14.3)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kalm_lib import report as rp

ROOT = Path(__file__).resolve().parent.parent
TOY_RUNNER = ROOT / "tests" / "fixtures" / "notebooks" / "toy_ablation_runner.py"
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=15000"]

pytestmark = pytest.mark.browser


def _chromium() -> str:
    for c in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if c and Path(c).is_file():
            return c
    pytest.skip("chromium is not installed (make browser): browser test skipped")


def _dom(page: Path, profile: Path) -> str:
    proc = subprocess.run([_chromium(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=240)
    assert "</html>" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def test_explorer_figure_of_executed_notebook_05_has_data(tmp_path, monkeypatch):
    """Notebook 05 run headless by papermill (a toy grid runner: seconds), exported to HTML by nbconvert and
    opened in Chromium: the explorer cell's figure is drawn, with one bar per non-baseline cell."""
    import nbconvert
    import papermill

    monkeypatch.setenv("KALM_HEADLESS", "1")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "browser", "design": "one_at_a_time", "seeds": [0, 1],
                                    "switches": {"focal": [False], "hard_negative_mixing": [False]}}))
    nb = ROOT / "notebooks" / "05_ablations.ipynb"
    executed = tmp_path / "05_executed.ipynb"
    papermill.execute_notebook(str(nb), str(executed), cwd=str(nb.parent), kernel_name="python3",
                               progress_bar=False, parameters={"run_dir": str(tmp_path / "run"), "grid": str(grid),
                                                               "runner": f"{TOY_RUNNER}:run", "level": "task"})
    body, _ = nbconvert.HTMLExporter().from_filename(str(executed))
    html_path = tmp_path / "05.html"
    html_path.write_text(body, encoding="utf-8")
    dom = _dom(html_path, tmp_path / "profile")
    after = dom[dom.rindex("explore_ablations"):]                    # the explorer cell and its output
    fig = re.search(r'class="plotly-graph-div[^"]*"(.*?)</script>', after, re.S)
    assert fig, "the explorer cell has no plotly figure"
    drawn = fig.group(1)
    assert 'class="main-svg"' in drawn, "the explorer's figure was not drawn"
    bars = re.findall(r'<g class="point"><path d="M[\d.]+,([\d.]+)V([\d.]+)H', drawn)
    # the explorer's default level is MTK: one bar per non-baseline cell (focal=off, hard_negative_mixing=off);
    # the toy runner penalises focal=off only, so its bar has height and the other is flat
    assert len(bars) == 2, f"expected 2 bars, found {len(bars)}"
    heights = sorted(abs(float(a) - float(b)) for a, b in bars)
    assert heights[0] == 0 and heights[1] > 10
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(html_path, ARTIFACTS / "05_ablations_executed.html")


SORT_PROBE = """<script>window.addEventListener('load',function(){
var t=document.querySelectorAll('#anchors table.sortable')[0],th=null;
Array.prototype.forEach.call(t.tHead.rows[0].cells,function(c){if(c.textContent==='MTK')th=c;});
function col(){return Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[th.cellIndex].getAttribute('data-v');});}
var out={before:col()};th.click();out.asc=col();th.click();out.desc=col();
var p=document.createElement('pre');p.id='sort-probe';p.textContent=JSON.stringify(out);document.body.appendChild(p);});
</script>"""


def test_ranked_tables_sort_on_click(tmp_path):
    run = tmp_path / "r"
    (run / "train" / "ft").mkdir(parents=True)
    (run / "train" / "ft" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    page = rp.build_report([run], tmp_path / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", SORT_PROBE + "</body>"), encoding="utf-8")
    dom = _dom(probe, tmp_path / "profile")
    m = re.search(r'<pre id="sort-probe">(.*?)</pre>', dom, re.S)
    assert m, "the probe did not run"
    got = json.loads(m.group(1).replace("&quot;", '"'))
    values = [float(v) for v in got["before"]]
    assert values != sorted(values)                        # ranked by MTK over complete rows only, partial after
    assert [float(v) for v in got["asc"]] == sorted(values)
    assert [float(v) for v in got["desc"]] == sorted(values, reverse=True)
