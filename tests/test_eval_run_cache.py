"""Each model is evaluated once per task in a run (issue 16): the stage notebooks and the report share the run's
evaluation cache (``<run_dir>/.eval-cache``), so the report re-reads what a stage already scored."""

from __future__ import annotations

import pytest

from kalm_lib import evaluation as ev
from kalm_lib import report
from kalm_lib.model import EmbeddingModel

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def test_report_reuses_a_stage_evaluation_of_the_same_weights(tiny_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    final = run / "train" / "pretrain" / "final"
    EmbeddingModel.from_pretrained(str(tiny_dir)).save(final)
    calls = []
    real_encode = EmbeddingModel.encode

    def counting_encode(self, *args, **kwargs):
        calls.append(1)
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingModel, "encode", counting_encode)
    # the stage notebook's "after" check (notebook 02: plan.eval_dir, the run's cache)
    stage = ev.evaluate_model(str(final), "smoke", run / "train" / "pretrain" / "eval",
                              overrides=["tasks=[KalmDev-STSB-en]"], mteb_cache=ev.run_eval_cache(run))
    assert calls, "the first evaluation encodes"
    encoded = len(calls)
    # the report stage, same model folder and task: served from the cache, not encoded again
    again = report.evaluate_run(run, [str(final)], "smoke", overrides=["tasks=[KalmDev-STSB-en]"])
    assert len(calls) == encoded
    assert again["main_score"].tolist() == stage["main_score"].tolist()
    assert (run / "eval" / ev.RESULTS_DIR).is_dir()           # the report's own results are still written
    # other weights (a re-trained model in the same folder) are never served the old scores
    EmbeddingModel.tiny_decoder("qwen2", seed=5, max_length=64).save(final)
    report.evaluate_run(run, [str(final)], "smoke", overrides=["tasks=[KalmDev-STSB-en]"])
    assert len(calls) > encoded
