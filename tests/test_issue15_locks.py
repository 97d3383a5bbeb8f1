"""Issue 15: locks on the evaluation caches and output folders, with real concurrent processes.

- the soup score cache: two processes appending at once keep every entry; each sees the other's; a torn last
  line left by a killed writer does not swallow the next entry;
- the distillation teacher cache: two runs wanting the same entry at once compute it once (the second waits);
- evaluation results: two processes merging into one model's ``kalm_eval.json`` lose nothing; two concurrent
  ``kalm eval`` into one out dir keep both task sets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kalm_lib.soup.scoring import ScoreCache

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _together(scripts: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start every script as its own process at once (they wait on a go-file), then collect them."""
    procs = [subprocess.Popen([PY, "-c", textwrap.dedent(s)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in scripts]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


_START = """
import os, time
from pathlib import Path
go = Path({go!r})
while not go.exists():
    time.sleep(0.005)
"""


def _release(go: Path) -> None:
    go.write_text("go")


# ------------------------------------------------------------------------------------------ soup score cache
def test_two_processes_appending_to_one_soup_score_cache_keep_every_entry(tmp_path):
    cache, go = tmp_path / "scores.jsonl", tmp_path / "go"
    script = _START + """
from kalm_lib.soup.scoring import ScoreCache
c = ScoreCache({cache!r})
for i in range(150):
    c.put(f"{tag}-{{i}}", {{"score": i, "tasks": {{"T": i}}, "scorer": "s", "weights": [0.5, 0.5]}})
# every entry of the other process that was written before ours is visible without re-opening the cache
print(sum(1 for k in c.entries if k.startswith("{other}")))
"""
    import threading
    threading.Timer(2.0, _release, [go]).start()
    a, b = _together([script.format(go=str(go), cache=str(cache), tag="a", other="b"),
                      script.format(go=str(go), cache=str(cache), tag="b", other="a")])
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    lines = cache.read_text().splitlines()
    assert len(lines) == 300 and all(json.loads(ln)["scorer"] == "s" for ln in lines)
    fresh = ScoreCache(cache)
    assert sorted(fresh.entries) == sorted([f"a-{i}" for i in range(150)] + [f"b-{i}" for i in range(150)])
    assert fresh.get("b-149")["score"] == 149
    # the process that finished last read everything the other wrote
    assert max(int(a.stdout.strip()), int(b.stdout.strip())) == 150
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*"))


def test_a_torn_last_line_does_not_swallow_the_next_entry(tmp_path):
    cache = tmp_path / "scores.jsonl"
    ScoreCache(cache).put("k1", {"score": 1.0})
    with open(cache, "a", encoding="utf-8") as f:
        f.write('{"key": "k2", "score": 2')  # a writer killed mid-append
    c = ScoreCache(cache)
    assert sorted(c.entries) == ["k1"]
    c.put("k3", {"score": 3.0})
    assert sorted(ScoreCache(cache).entries) == ["k1", "k3"]
    assert cache.read_text().splitlines()[-1] == '{"key": "k3", "score": 3.0}'


def test_a_process_sees_entries_another_appended_after_it_opened_the_cache(tmp_path):
    cache = tmp_path / "scores.jsonl"
    mine = ScoreCache(cache)
    subprocess.run([PY, "-c", f"from kalm_lib.soup.scoring import ScoreCache; "
                              f"ScoreCache({str(cache)!r}).put('theirs', {{'score': 7.0}})"],
                   cwd=REPO, env=_env(), check=True, timeout=120)
    assert mine.get("theirs") == {"key": "theirs", "score": 7.0}


# ------------------------------------------------------------------------------------------ teacher cache
def test_two_runs_sharing_a_teacher_cache_compute_it_once(tmp_path):
    go, log = tmp_path / "go", tmp_path / "encodes.log"
    script = _START + """
import json
import numpy as np
from kalm_lib.train.data import teacher_scores
class Teacher:  # deterministic vectors from the text; each encode call is logged and slow
    def encode(self, texts, prompt=None, batch_size=64, show_progress=False):
        with open({log!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(1.0)
        return np.stack([np.random.default_rng(sum(map(ord, (prompt or "") + t))).standard_normal(8)
                         for t in texts]).astype(np.float32)
records = [{{"query": f"q{{i}}", "pos": [f"p{{i}}"], "neg": [f"n{{i}}", f"m{{i}}"], "instruction": ""}}
           for i in range(6)]
cache = teacher_scores(Teacher(), records, cache_dir={cache!r}, key_parts={{"teacher": "t"}}, show_progress=False)
print(json.dumps([float(x) for x in cache.scores]))
"""
    import threading
    threading.Timer(2.0, _release, [go]).start()
    runs = _together([script.format(go=str(go), log=str(log), cache=str(tmp_path / "cache"))] * 2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    callers = set(log.read_text().split())
    assert len(callers) == 1  # one process encoded (in one or more encode calls); the other waited and read it
    scores = [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]
    assert scores[0] == scores[1] and len(scores[0]) == 18
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1 and not list((tmp_path / "cache").glob("*.lock"))
    assert not list((tmp_path / "cache").glob(".*"))


# ------------------------------------------------------------------------------------------ evaluation results
def test_two_processes_merging_one_eval_record_lose_nothing(tmp_path):
    go, folder = tmp_path / "go", tmp_path / "out" / "kalm" / "m" / "r"
    script = _START + """
from types import SimpleNamespace
from kalm_lib.evaluation.encoder import InstructionConfig
from kalm_lib.evaluation.run import _write_eval_record
enc = SimpleNamespace(prompts_used={{}}, mteb_model_meta=SimpleNamespace(name="m", revision="r"), dim=8,
                      model=object(), use_instructions=False, prompts=None, instructions=InstructionConfig(),
                      config_hash="h")
Path({folder!r}).mkdir(parents=True, exist_ok=True)
for i in range(25):
    name = f"{tag}-Task{{i}}"
    _write_eval_record(Path({folder!r}), enc, [name], {{f"{tag}-Bad{{i}}": "boom"}} if i % 5 == 0 else {{}},
                       {{name: float(i)}}, None)
"""
    import threading
    threading.Timer(2.0, _release, [go]).start()
    runs = _together([script.format(go=str(go), folder=str(folder), tag=t) for t in ("a", "b")])
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    record = json.loads((folder / "kalm_eval.json").read_text())
    assert sorted(record["task_seconds"]) == sorted(f"{t}-Task{i}" for t in "ab" for i in range(25))
    assert sorted(record["errors"]) == sorted(f"{t}-Bad{i}" for t in "ab" for i in range(0, 25, 5))
    assert json.loads((folder / "errors.json").read_text()) == record["errors"]
    assert sorted(p.name for p in folder.iterdir()) == ["errors.json", "kalm_eval.json"]  # no lock, no temp left


@pytest.mark.slow
def test_two_concurrent_kalm_evals_into_one_out_dir_keep_both_task_sets(tmp_path):
    out = tmp_path / "eval"
    cmd = [PY, "-m", "kalm_lib.cli", "eval", "minilm", "--quick", "--out", str(out), "--no-progress", "--tasks"]
    procs = [subprocess.Popen(cmd + [task], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for task in ("KalmDev-STSB-en", "KalmDev-STSB-zh")]
    done = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in done), [err[-2000:] for _, err, _ in done]
    (results,) = (out / "results").glob("*/*")
    assert {p.name for p in results.glob("KalmDev-*.json")} == {"KalmDev-STSB-en.json", "KalmDev-STSB-zh.json"}
    (record,) = (out / "kalm").glob("*/*/kalm_eval.json")
    assert sorted(json.loads(record.read_text())["task_seconds"]) == ["KalmDev-STSB-en", "KalmDev-STSB-zh"]
    settings = [json.loads(ln) for ln in (results / "run_settings.jsonl").read_text().splitlines() if ln.strip()]
    assert len(settings) >= 2
    assert not list(out.rglob(".kalm-eval.lock")) and not list(out.rglob(".*tmp-*"))
