"""Streamed training data, data side: each process's share of a source (kalm_lib.data.shards) and the global
batches over sources (kalm_lib.data.mixture). Shares are disjoint and complete for every file kind and process
count, positions resume exactly, global batches are task-homogeneous across ranks (simulated ranks in threads,
and real gloo processes)."""

from __future__ import annotations

import collections
import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_lib.data.cards import HubSpec
from kalm_lib.data.mixture import MixtureError, StreamMixture, source_weights
from kalm_lib.data.records import Tally
from kalm_lib.data.shards import FileSource, HubSource, estimate_rows, expand_files, source_name

REPO = Path(__file__).resolve().parent.parent


def record(src: str, i: int, task: str = "retrieval") -> dict:
    return {"id": f"{src}-{i}", "query": f"query {i} of {src}", "pos": [f"passage {i} of {src}"], "neg": [],
            "task_type": task, "category": "c", "instruction": "", "lang": "en", "source": src}


def write_jsonl_with_noise(path: Path, src: str, n: int) -> dict:
    """n records plus every kind of line a reader must account for; returns what the file holds."""
    lines, ids = [], []
    for i in range(n):
        line = json.dumps(record(src, i)) + "\n"
        if i % 11 == 3:
            line = line[:-1] + "\r\n"                       # CRLF
        if i % 13 == 5:
            line = "\ufeff" + line                           # a BOM on any line
        lines.append(line)
        ids.append(f"{src}-{i}")
        if i % 7 == 0:
            lines.append("\n")                               # blank
        if i % 17 == 0:
            lines.append('{"query": "broken\n')              # malformed JSON
        if i % 19 == 0:
            lines.append(json.dumps({"query": "no positive", "pos": []}) + "\n")
    path.write_bytes("".join(lines).encode("utf-8"))
    return {"ids": ids, "rows": sum(1 for ln in lines if ln.strip()), "blank": sum(1 for ln in lines if not ln.strip()),
            "rejected": {"malformed_json": sum(1 for i in range(n) if i % 17 == 0),
                         "no_positive": sum(1 for i in range(n) if i % 19 == 0)}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("shards")
    a1 = write_jsonl_with_noise(d / "alpha-00000.jsonl", "alpha", 97)
    a2 = write_jsonl_with_noise(d / "alpha-00001.jsonl", "alpha-b", 41)
    with gzip.open(d / "beta.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(record("beta", i)) + "\n" for i in range(53))
    pq.write_table(pa.Table.from_pylist([record("gamma", i, "classification") for i in range(60)]),
                   d / "gamma-00000-of-00002.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist([record("gamma2", i, "classification") for i in range(45)]),
                   d / "gamma-00001-of-00002.parquet", row_group_size=10)
    return {"dir": d,
            "alpha": {"files": [d / "alpha-00000.jsonl", d / "alpha-00001.jsonl"], "ids": a1["ids"] + a2["ids"],
                      "rows": a1["rows"] + a2["rows"], "blank": a1["blank"] + a2["blank"],
                      "rejected": {k: a1["rejected"][k] + a2["rejected"][k] for k in a1["rejected"]}},
            "beta": {"files": [d / "beta.jsonl.gz"], "ids": [f"beta-{i}" for i in range(53)], "rows": 53, "blank": 0,
                     "rejected": {}},
            "gamma": {"files": sorted(d.glob("gamma-*.parquet")), "rows": 105, "blank": 0, "rejected": {},
                      "ids": [f"gamma-{i}" for i in range(60)] + [f"gamma2-{i}" for i in range(45)]}}


def test_source_names_drop_shard_numbers_and_globs_expand(sources):
    assert source_name("all-nli-00003-of-00016.jsonl") == "all-nli"
    assert source_name("afqmc.parquet") == "afqmc" and source_name("x_00012.jsonl.gz") == "x"
    files = expand_files([str(sources["dir"] / "*")], "test")
    assert {source_name(f) for f in files} == {"alpha", "beta", "gamma"}
    assert expand_files([str(sources["dir"])], "test") == files      # a folder = its shards
    with pytest.raises(ValueError, match="matches no file"):
        expand_files([str(sources["dir"] / "nothing-*.jsonl")], "data.train_files")


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_process_shares_are_disjoint_and_complete_with_every_line_accounted(sources, name, world):
    src = sources[name]
    seen, totals = [], Tally()
    for rank in range(world):
        tally = Tally()
        reader = FileSource(name, src["files"], rank=rank, world=world, tally=tally, batch_rows=4)
        rows = reader.take(10**6)
        assert reader.take(5) == []                      # the pass is over
        seen += [r["id"] for r in rows]
        tally.check()
        totals.merge(tally)
    assert sorted(seen) == sorted(src["ids"]) and len(seen) == len(set(seen))   # disjoint, union = all
    t = totals.as_dict()
    assert t["rows_in"] == src["rows"] and t["blank_lines"] == src["blank"]       # every line counted once
    assert t["rejected_by_reason"] == src["rejected"]


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma"])
def test_a_reader_resumed_from_its_state_yields_exactly_the_rest(sources, name):
    src = sources[name]
    for world, rank in ((1, 0), (3, 1), (3, 2)):
        for cut in (1, 4, 9):
            straight_tally, t1 = Tally(), Tally()
            straight = FileSource(name, src["files"], rank=rank, world=world, tally=straight_tally, batch_rows=3)
            first = FileSource(name, src["files"], rank=rank, world=world, tally=t1, batch_rows=3)
            head = first.take(cut)
            state, counts = json.loads(json.dumps(first.state())), json.loads(json.dumps(t1.state()))
            again = FileSource(name, src["files"], rank=rank, world=world, tally=Tally().load_state(counts), batch_rows=3)
            again.load_state(state)
            rest = again.take(10**6)
            assert [r["id"] for r in head + rest] == [r["id"] for r in straight.take(10**6)], (world, rank, cut)
            assert again.tally.as_dict() == straight_tally.as_dict()       # counted once, across the resume


def test_every_pass_reads_everything_in_a_new_file_order(sources):
    src = sources["gamma"]
    reader = FileSource("gamma", src["files"], rank=0, world=1, tally=Tally(), seed=3)
    orders, ids = [], []
    for _ in range(4):
        orders.append([f.name for f in reader.order()])
        ids.append([r["id"] for r in reader.take(10**6)])
        reader.next_pass()
    assert all(sorted(i) == sorted(src["ids"]) for i in ids)
    assert len({tuple(o) for o in orders}) > 1                           # the file order changes between passes


def test_row_estimates_are_exact_for_parquet_and_small_jsonl(sources):
    assert estimate_rows(sources["gamma"]["files"]) == 105
    assert estimate_rows(sources["alpha"]["files"]) == sources["alpha"]["rows"] + sources["alpha"]["blank"]


def test_source_weights_follow_size_and_temperature():
    p1 = source_weights({"big": 900, "small": 100}, {}, 1.0)
    assert p1 == pytest.approx({"big": 0.9, "small": 0.1})
    p2 = source_weights({"big": 900, "small": 100}, {}, 2.0)
    assert p2["small"] == pytest.approx(10 / (30 + 10))                  # sqrt sizes: 30 vs 10
    p3 = source_weights({"big": 900, "small": 100}, {"small": 9.0}, 1.0)
    assert p3 == pytest.approx({"big": 0.5, "small": 0.5})


# ------------------------------------------------------------------------------------------ simulated ranks
class ThreadGather:
    """``gather`` for ``world`` ranks running in threads (what accelerate's gather_object does across processes)."""

    def __init__(self, world: int):
        self.slots, self.barrier = [None] * world, threading.Barrier(world)

    def for_rank(self, rank: int):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        return gather


def run_ranks(world: int, make_readers, n_batches: int, per_device: int, probabilities: dict, seed: int = 0):
    """Every rank's slices of ``n_batches`` global batches, each rank in its own thread."""
    gather, out, errors = ThreadGather(world), [None] * world, []

    def work(rank):
        try:
            mixture = StreamMixture(make_readers(rank), probabilities, seed=seed, per_device=per_device,
                                    gather=gather.for_rank(rank))
            out[rank] = ([mixture.next() for _ in range(n_batches)], mixture)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            gather.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def exact_sources(d: Path, sizes: dict[str, int]) -> dict[str, list[Path]]:
    out = {}
    for name, n in sizes.items():
        path = d / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist([record(name, i, "classification" if name == "c" else "retrieval")
                                             for i in range(n)]), path, row_group_size=5)
        out[name] = [path]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_global_batches_are_task_homogeneous_across_ranks_and_a_pass_covers_every_row(tmp_path, world):
    per = 4
    sizes = {"a": 12 * world * per, "b": 5 * world * per, "c": 3 * world * per}   # whole global batches per pass
    files = exact_sources(tmp_path, sizes)
    p = source_weights(sizes, {}, 1.0)

    def readers(rank):
        return {s: FileSource(s, f, rank=rank, world=world, tally=Tally()) for s, f in files.items()}

    n = sum(sizes.values()) // (world * per) + 6
    out = run_ranks(world, readers, n, per, p)
    per_pass = collections.defaultdict(list)
    for k in range(n):
        slices = [out[r][0][k] for r in range(world)]
        assert len({s.source for s in slices}) == 1                       # one source for the whole global batch
        assert all({row["source"] for row in s.rows} == {s.source} for s in slices)
        everyone = [row["id"] for s in slices for row in s.rows]
        assert all(s.ids == everyone for s in slices)                      # every rank knows the global ids
        per_pass[(slices[0].source, slices[0].pass_no)] += everyone
    for (source, pass_no), ids in per_pass.items():
        assert len(ids) == len(set(ids))                                   # no row twice within a pass
        if (source, pass_no + 1) in per_pass:                              # a finished pass: every row, once
            assert sorted(ids) == sorted(f"{source}-{i}" for i in range(sizes[source]))
    assert any(pass_no > 0 for _, pass_no in per_pass)                     # passes restarted along the way
    assert all(m.dropped == collections.Counter() for _, m in out)         # exact splits: nothing dropped


def test_unequal_shares_end_a_pass_for_every_rank_together(tmp_path):
    """Plain JSONL byte ranges give ranks unequal row counts: the pass of a source ends on every rank as soon as
    one rank runs short, the short slices are dropped (counted) and no rank sees a mixed batch."""
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(record("s", i)) + ("\n" if i % 3 else "   \n") for i in range(50)))

    def readers(rank):
        return {"s": FileSource("s", [path], rank=rank, world=2, tally=Tally())}

    out = run_ranks(2, readers, 30, 3, {"s": 1.0})
    for k in range(30):
        assert out[0][0][k].pass_no == out[1][0][k].pass_no
    assert sum(m.dropped["s"] for _, m in out) > 0 or 50 % 6 == 0


def test_a_source_smaller_than_a_batch_is_a_clear_error(tmp_path):
    files = exact_sources(tmp_path, {"tiny": 3})
    with pytest.raises(MixtureError, match="'tiny'.*fewer than 4 rows"):
        run_ranks(1, lambda r: {"tiny": FileSource("tiny", files["tiny"], rank=r, world=1, tally=Tally())}, 1, 4,
                  {"tiny": 1.0})


def test_a_mixture_resumed_from_its_state_makes_the_same_batches(sources):
    def readers():
        tally = Tally()
        return {s: FileSource(s, sources[s]["files"], rank=0, world=1, tally=tally) for s in ("alpha", "beta", "gamma")}

    p = source_weights({"alpha": 3, "beta": 1, "gamma": 2}, {}, 1.0)
    straight = StreamMixture(readers(), p, seed=5, per_device=6, gather=lambda o: [o])
    ids = [[r["id"] for r in straight.next().rows] for _ in range(40)]
    first = StreamMixture(readers(), p, seed=5, per_device=6, gather=lambda o: [o])
    head = [[r["id"] for r in first.next().rows] for _ in range(17)]
    again = StreamMixture(readers(), p, seed=5, per_device=6, gather=lambda o: [o])
    again.load_state(json.loads(json.dumps(first.state())))
    assert head + [[r["id"] for r in again.next().rows] for _ in range(23)] == ids


# ------------------------------------------------------------------------------------------ hub datasets
def test_hub_source_shares_through_datasets_streaming_are_disjoint_complete_and_resumable(tmp_path):
    """A hub dataset laid out as the hub serves it (parquet shards), read through datasets streaming with
    split_dataset_by_node: whole shards per rank (2 shards) or one row in two (3 shards)."""
    for n_files in (2, 3):
        d = tmp_path / f"hub{n_files}"
        d.mkdir()
        rows = [{"anchor": f"anchor {f}-{i}", "positive": f"positive {f}-{i}"} for f in range(n_files) for i in range(9)]
        for f in range(n_files):
            pq.write_table(pa.Table.from_pylist(rows[f * 9:(f + 1) * 9]), d / f"train-{f:05d}-of-{n_files:05d}.parquet")
        spec = HubSpec(path="parquet", data_files=[str(p) for p in sorted(d.glob("*.parquet"))],
                       columns={"query": "anchor", "pos": "positive"}, task_type="retrieval", lang="en")
        got = []
        for rank in range(2):
            tally = Tally()
            src = HubSource("h", spec, rank=rank, world=2, tally=tally)
            got += [r["query"] for r in src.take(100)]
            assert tally.as_dict()["kept"] == tally.as_dict()["rows_in"]
        assert sorted(got) == sorted(r["anchor"] for r in rows) and len(got) == len(set(got))
        first = HubSource("h", spec, rank=1, world=2, tally=Tally())
        head = [r["query"] for r in first.take(4)]
        again = HubSource("h", spec, rank=1, world=2, tally=Tally())
        again.load_state(json.loads(json.dumps(first.state())))
        straight = [r["query"] for r in HubSource("h", spec, rank=1, world=2, tally=Tally()).take(100)]
        assert head + [r["query"] for r in again.take(100)] == straight


# ------------------------------------------------------------------------------------------ real processes
GLOO_SCRIPT = r'''
import json, os, sys
import torch.distributed as dist
from pathlib import Path
from kalm_lib.data.mixture import StreamMixture, source_weights
from kalm_lib.data.records import Tally
from kalm_lib.data.shards import FileSource
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
files = json.loads(sys.argv[1])
sizes = json.loads(sys.argv[2])

def gather(obj):
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out

tally = Tally()
mixture = StreamMixture({s: FileSource(s, [Path(f) for f in fs], rank=rank, world=world, tally=tally)
                         for s, fs in files.items()}, source_weights(sizes, {}, 1.0), seed=1, per_device=3,
                        gather=gather)
out = [[s.source, s.pass_no, [r["id"] for r in s.rows], s.ids] for s in (mixture.next() for _ in range(int(sys.argv[3])))]
Path(sys.argv[4], f"rank{rank}.json").write_text(json.dumps({"slices": out, "tally": tally.as_dict()}))
dist.destroy_process_group()
'''


def test_two_gloo_processes_read_disjoint_complete_task_homogeneous_slices(tmp_path):
    sizes = {"a": 30, "b": 18}                           # 5 and 3 global batches of 2 x 3 rows per pass
    files = {s: [str(p) for p in ps] for s, ps in exact_sources(tmp_path, sizes).items()}
    (tmp_path / "run.py").write_text(GLOO_SCRIPT)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(tmp_path / "run.py"),
                           json.dumps(files), json.dumps(sizes), "20", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    by_source = collections.defaultdict(list)
    for (s0, p0, ids0, all0), (s1, p1, ids1, all1) in zip(r0["slices"], r1["slices"]):
        assert (s0, p0) == (s1, p1) and all0 == all1 == ids0 + ids1       # same source and pass on both ranks
        assert not set(ids0) & set(ids1)                                 # disjoint
        by_source[(s0, p0)] += ids0 + ids1
    finished = [(s, p) for s, p in by_source if (s, p + 1) in by_source]
    assert {s for s, _ in finished} == {"a", "b"}                          # 20 batches: both sources restarted
    for s, p in finished:                                                  # a finished pass: every row, once
        assert sorted(by_source[(s, p)]) == sorted(f"{s}-{i}" for i in range(sizes[s]))
