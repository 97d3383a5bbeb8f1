"""``kalm curate`` / ``kalm mine``: every user mistake is one line on stderr that names what and where, exit
code 2, no traceback; ``--debug`` shows the traceback instead."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kalm_lib.data.cli import curate_main, mine_main

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, main, argv, prog):
    """Run ``main(argv)``: exit code 2 and exactly one stderr line ``<prog>: error: ...``; returns it."""
    rc = main(argv)
    err = capsys.readouterr().err
    # (a progress bar may have started before the mistake showed: it is not an error line)
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"query": "a question", "pos": ["an answer"]}) + "\n")
    hub = tmp_path / "hubds"  # a dataset folder datasets' streaming reads offline, with its own column names
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"question": f"q{i} text", "answer": f"a{i} text"}) + "\n"
                                             for i in range(3)))
    return tmp_path, good, hub


def yaml_file(tmp_path, text, name):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


CURATE_MISTAKES = [
    # (argv after --out, words the one line must contain)
    (["--config", "no-such-preset"], ["config not found", "no-such-preset", "known curation configs"]),
    (["--config", "{broken}"], ["not valid YAML", "broken.yaml"]),
    (["--config", "{python}"], ["not valid YAML", "python"]),
    (["--config", "{unknown_key}"], ["unknown key", "bogus", "key.yaml"]),
    (["--config", "{unknown_source}"], ["unknown source", "nope", "src.yaml"]),
    (["--config", "smoke", "--set", "filters.max_chars=lots"], ["filters.max_chars", "expected an integer"]),
    (["--config", "smoke", "--set", "stream.dedup_fpr=2"], ["dedup_fpr"]),
    (["--config", "smoke", "--set", "novalue"], ["novalue", "key=value"]),
    (["--input", "{missing}"], ["input not found", "nowhere.jsonl"]),
    (["--input", "{empty_dir}"], ["no *.jsonl", "empty_dir"]),
    (["--input", "{good}", "--columns", "query"], ["--columns", "'query'"]),
    (["--input", "hf:{hub}:train"], ["no column 'query'", "question", "answer", "--columns"]),
    (["--input", "hf:{hub}:train", "--columns", "query=question,pos=anwser"], ["no column 'anwser'", "answer"]),
    (["--input", "hf:{hub}:train", "--stream", "--columns", "query=quest,pos=answer"], ["no column 'quest'"]),
    (["--input", "hf:no/such-dataset:train"], ["cannot open the dataset", "no/such-dataset"]),
    ([], ["nothing to curate", "--input"]),
    (["--input", "{good}", "--set", "mining.window_start=200"], ["mining", "window_start"]),
]


@pytest.mark.parametrize("argv,words", CURATE_MISTAKES, ids=lambda x: str(x)[:40])
def test_kalm_curate_mistakes_are_one_line(capsys, files, argv, words):
    tmp, good, hub = files
    (tmp / "empty_dir").mkdir(exist_ok=True)
    configs = {"{broken}": yaml_file(tmp, "name: x\nsources: [\n", "broken.yaml"),
               "{python}": yaml_file(tmp, "name: !!python/object/apply:os.system ['true']\n", "python.yaml"),
               "{unknown_key}": yaml_file(tmp, "name: x\nbogus: 1\n", "key.yaml"),
               "{unknown_source}": yaml_file(tmp, "name: x\nsources:\n  - {name: nope, stage: pretrain}\n", "src.yaml"),
               "{missing}": str(tmp / "nowhere.jsonl"), "{empty_dir}": str(tmp / "empty_dir"), "{good}": str(good)}
    argv = [configs.get(a, a.replace("{hub}", str(hub))) for a in argv]
    line = one_line_error(capsys, curate_main, ["--out", str(tmp / "out")] + argv, "kalm curate")
    for w in words:
        assert w in line, (w, line)
    assert not [p for p in tmp.rglob("*") if ".tmp" in p.name]


def test_kalm_curate_refuses_a_folder_in_use_and_a_file_as_folder(capsys, files):
    tmp, good, _ = files
    out = tmp / "busy"
    out.mkdir()
    (out / ".kalm.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    line = one_line_error(capsys, curate_main, ["--out", str(out), "--input", str(good)], "kalm curate")
    assert "in use" in line and str(os.getpid()) in line
    line = one_line_error(capsys, curate_main, ["--out", str(good), "--input", str(good)], "kalm curate")
    assert "good.jsonl" in line


def test_debug_shows_the_traceback(files):
    tmp, _, _ = files
    from kalm_lib.data.records import DataFormatError

    with pytest.raises(DataFormatError, match="input not found"):
        curate_main(["--out", str(tmp / "o"), "--input", str(tmp / "nowhere"), "--debug"])


def test_a_users_jsonl_is_curated_without_a_config(capsys, files):
    tmp, good, hub = files
    assert curate_main(["--out", str(tmp / "o"), "--input", str(good), "--stage", "finetune",
                        "--set", "mining.enabled=false"]) == 0
    rows = [json.loads(x) for x in (tmp / "o" / "finetune.jsonl").read_text().splitlines()]
    assert [(r["query"], r["pos"]) for r in rows] == [("a question", ["an answer"])]
    # a hub-style dataset with a column mapping, in memory
    assert curate_main(["--out", str(tmp / "h"), "--input", f"hf:{hub}:train",
                        "--columns", "query=question,pos=answer"]) == 0
    rows = [json.loads(x) for x in (tmp / "h" / "pretrain.jsonl").read_text().splitlines()]
    assert [(r["query"], r["pos"]) for r in rows] == [(f"q{i} text", [f"a{i} text"]) for i in range(3)]


MINE_MISTAKES = [
    (["--in", "{missing}", "--out", "{out}"], ["input not found", "nowhere.jsonl"]),
    (["--in", "{bad}", "--out", "{out}"], ["no usable records", "malformed_json"]),
    (["--in", "{good}", "--out", "{out}", "--model", "{nomodel}"], ["model folder does not exist", "no-model"]),
    (["--in", "{good}", "--out", "{out}", "--window", "9", "3"], ["window_start", "window_end"]),
    (["--in", "{good}", "--out", "{out}", "--device", "tpu"], ["device", "tpu"]),
    (["--run", "{tmp}"], ["no curated fine-tuning records", "run the curation stage"]),
    (["--in", "{gzfake}", "--out", "{out}"], ["named .gz but not gzip", "fake.jsonl.gz"]),
]
if not torch.cuda.is_available():
    MINE_MISTAKES.append((["--in", "{good}", "--out", "{out}", "--device", "cuda"], ["no CUDA device"]))


@pytest.mark.parametrize("argv,words", MINE_MISTAKES, ids=lambda x: str(x)[:40])
def test_kalm_mine_mistakes_are_one_line(capsys, files, argv, words):
    tmp, good, _ = files
    (tmp / "bad.jsonl").write_text("{broken\n")
    (tmp / "fake.jsonl.gz").write_text("{}\n")
    names = {"{missing}": str(tmp / "nowhere.jsonl"), "{out}": str(tmp / "mined.jsonl"), "{good}": str(good),
             "{bad}": str(tmp / "bad.jsonl"), "{nomodel}": str(tmp / "no-model"), "{tmp}": str(tmp),
             "{gzfake}": str(tmp / "fake.jsonl.gz")}
    line = one_line_error(capsys, mine_main, [names.get(a, a) for a in argv], "kalm mine")
    for w in words:
        assert w in line, (w, line)
    assert not (tmp / "mined.jsonl").exists()


def test_through_the_kalm_command(files):
    """The real entry point: exit code 2, one line, no traceback (and a traceback with --debug)."""
    tmp, _, _ = files
    cmd = [sys.executable, "-m", "kalm_lib.cli", "curate", "--out", str(tmp / "o"), "--config", str(tmp / "x.yaml")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "config not found" in p.stderr
    p = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "Traceback" in p.stderr
