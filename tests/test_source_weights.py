"""The per-source mixture (issue 16): ``data.source_weights`` draws each in-memory record ``w`` times (``w`` the
product of its source / lang:<code> / task:<type> weights, seeded, independent of file order), the trainer's
config and the ablation switch ``source_weights`` check it before any work."""

from __future__ import annotations

import collections
import json
import random

import pytest

from kalm_lib.ablations import GridError, expand, load_grid
from kalm_lib.config import ConfigError
from kalm_lib.train import load_config
from kalm_lib.train.data import DataError, load_training_data, weight_sources


def _records(n_per_source: int = 200) -> list[dict]:
    spec = [("cmrc2018", "zh", "retrieval"), ("tnews", "zh", "classification"), ("scifact", "en", "retrieval")]
    return [{"id": f"{src}-{i}", "query": f"q{i}", "pos": ["p"], "neg": [], "source": src, "lang": lang,
             "task_type": tt} for src, lang, tt in spec for i in range(n_per_source)]


def _per_source(records: list[dict]) -> collections.Counter:
    return collections.Counter(r["source"] for r in records)


def test_whole_weights_copy_and_drop_exactly_and_ids_stay_unique():
    out = weight_sources(_records(), {"cmrc2018": 2, "tnews": 0}, seed=0)
    assert _per_source(out) == {"cmrc2018": 400, "scifact": 200}
    assert len({r["id"] for r in out}) == len(out)
    # a copy is the record itself under a new id
    copy = next(r for r in out if r["id"] == "cmrc2018-7#1")
    assert {k: v for k, v in copy.items() if k != "id"} == {k: v for k, v in out[0].items() if k != "id"} | {"query": "q7"}


def test_key_weights_multiply_and_fractions_are_seeded_and_order_free():
    recs = _records(1000)
    out = weight_sources(recs, {"lang:zh": 1.5, "task:retrieval": 2}, seed=3)
    counts = _per_source(out)
    assert counts["scifact"] == 2000                       # en retrieval: 1 x 2
    # tnews: 1.5 = one copy + one more with p = 0.5 (binomial, 1000 draws: within 5 sigma of 1500)
    assert abs(counts["tnews"] - 1500) < 5 * (1000 * 0.25) ** 0.5
    assert counts["cmrc2018"] == 3000                       # zh retrieval: 1.5 x 2 = 3 exactly
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    again = weight_sources(shuffled, {"lang:zh": 1.5, "task:retrieval": 2}, seed=3)
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in out)
    other_seed = weight_sources(recs, {"lang:zh": 1.5, "task:retrieval": 2}, seed=4)
    assert sorted(r["id"] for r in other_seed) != sorted(r["id"] for r in out)


def test_a_key_that_matches_nothing_is_named():
    with pytest.raises(DataError, match=r"\['cmrc'\] match no record .*sources: \['cmrc2018', 'scifact', 'tnews'\]"):
        weight_sources(_records(), {"cmrc": 2}, seed=0)
    with pytest.raises(DataError, match="leave no record"):
        weight_sources(_records(), {"lang:zh": 0, "lang:en": 0}, seed=0)


def _config(tmp_path, **data):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(20)))
    return load_config({"stage": "finetune", "output_dir": str(tmp_path / "out"), "model": {"name_or_path": "x"},
                        "data": {"train_file": str(path), **data}})


def test_the_trainer_reads_the_mixture(tmp_path):
    records, counts = load_training_data(_config(tmp_path, source_weights={"scifact": 3}))
    assert counts["kept"] == 60                            # rows read: the file's
    assert _per_source(records) == {"cmrc2018": 20, "tnews": 20, "scifact": 60}


@pytest.mark.parametrize("data, match", [
    ({"source_weights": {"scifact": -1}}, "data.source_weights.scifact: must be a finite number >= 0"),
    ({"source_weights": {"scifact": "x"}}, "source_weights"),
    ({"source_weights": {"scifact": 2}, "streaming": True}, "data.source_weights: is for in-memory data"),
])
def test_bad_mixtures_are_config_errors(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **data)


def test_the_switch_names_cells_and_writes_the_mixture():
    spec = load_grid({"design": "one_at_a_time", "switches": {"source_weights": [{"lang:zh": 2}, {}]}})
    cells = {c.name: c for c in expand(spec)}
    assert set(cells) == {"full", "source_weights=lang:zh=2"}
    assert cells["source_weights=lang:zh=2"].overrides == {"data.source_weights": {"lang:zh": 2.0}}
    assert cells["full"].overrides == {"data.source_weights": {}}
    with pytest.raises(GridError, match="switch source_weights takes a mapping"):
        load_grid({"switches": {"source_weights": [{"lang:zh": -2}]}})
