"""Model soup: exact averaging, streaming memory, recipes, cache, bad input (kalm_lib.soup)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kalm_lib import soup
from kalm_lib.config import ConfigError
from kalm_lib.model import EmbeddingModel
from kalm_lib.soup.cli import cli_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

QUERIES = ["how do I reset my card pin", "what is the capital of france", "symptoms of the flu in children",
           "best way to learn python", "when did the second world war end", "how to bake sourdough bread",
           "is coffee bad for sleep", "what causes rain", "how far is the moon", "who wrote hamlet"]
DOCS = ["To change your PIN, open the card menu and choose reset.", "Paris is the capital and largest city of France.",
        "Children with influenza often have fever, cough and aches.", "Practise small projects to learn Python fast.",
        "The Second World War ended in 1945.", "Sourdough needs a starter, flour, water and a long rise.",
        "Caffeine late in the day can disturb sleep.", "Rain forms when water vapour condenses into droplets.",
        "The Moon is about 384,000 km from Earth.", "Hamlet is a tragedy written by William Shakespeare."]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.02) -> Path:
    """A "fine-tuned" ingredient: the base checkpoint with small seeded noise on every float tensor."""
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g) if v.is_floating_point()
             else v for k, v in state.items()}
    save_file(noisy, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soup_ckpts")
    base = EmbeddingModel.tiny_decoder("qwen2", seed=0).save(root / "base")
    out = {"base": base}
    for k in (1, 2, 3):
        out[f"ft{k}"] = perturbed_copy(base, root / f"ft{k}", seed=k, scale=0.1 * k)
    out["copy"] = shutil.copytree(base, root / "copy")
    out["seed1"] = EmbeddingModel.tiny_decoder("qwen2", seed=1).save(root / "seed1")
    return out


@pytest.fixture(scope="module")
def scorer():
    return soup.PairRetrievalScorer({"toy": (QUERIES, DOCS)})


# ---------------------------------------------------------------------------------------------- averaging
def test_soup_of_identical_checkpoints_is_the_checkpoint_bit_for_bit(ckpts, tmp_path):
    ings = soup.load_ingredients([ckpts["base"], ckpts["copy"], ckpts["base"]])
    out = soup.write_soup(ings, [0.2, 0.3, 0.5], tmp_path / "soup")
    got, want = load_file(str(out / "model.safetensors")), load_file(str(ckpts["base"] / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # and the uniform 1/3 weights, whose float products are inexact, still give the checkpoint exactly
    third = soup.average_checkpoints(ings, soup.uniform_weights(3))
    assert all(torch.equal(third[k], want[k]) for k in want)


def test_weighted_soup_equals_hand_computed_average(ckpts, tmp_path):
    paths = [ckpts["ft1"], ckpts["ft2"], ckpts["seed1"]]
    weights = [0.2, 0.3, 0.5]
    ings = soup.load_ingredients(paths)
    out = soup.write_soup(ings, weights, tmp_path / "soup", extra={"recipe": "test"})
    got = load_file(str(out / "model.safetensors"))
    states = [load_file(str(p / "model.safetensors")) for p in paths]
    for k in states[0]:
        expected = sum(w * s[k].double() for w, s in zip(weights, states))
        assert torch.allclose(got[k].double(), expected, rtol=1e-6, atol=1e-7), k
        assert not torch.equal(got[k], states[0][k])  # it really mixed something
    meta = json.loads((out / "kalm_config.json").read_text())
    assert [i["sha256"] for i in meta["soup"]["ingredients"]] == [sha256(p / "model.safetensors") for p in paths]
    assert [i["weight"] for i in meta["soup"]["ingredients"]] == weights
    assert meta["soup"]["recipe"] == "test" and meta["pooling"] == "mean" and meta["bidirectional"] is True
    assert meta["soup"]["weights_sha256"] == sha256(out / "model.safetensors")
    assert not list(tmp_path.glob(".soup.*"))  # no temp folder left behind


def test_one_hot_weights_return_that_ingredient_exactly(ckpts):
    ings = soup.load_ingredients([ckpts["ft1"], ckpts["ft2"]])
    got = soup.average_checkpoints(ings, [0.0, 1.0])
    want = load_file(str(ckpts["ft2"] / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_soup_folder_loads_in_sentence_transformers_and_embeddingmodel(ckpts, tmp_path):
    from sentence_transformers import SentenceTransformer

    ings = soup.load_ingredients([ckpts["ft1"], ckpts["ft3"]])
    out = soup.write_soup(ings, [0.5, 0.5], tmp_path / "soup")
    ours = EmbeddingModel.from_pretrained(out)
    assert (ours.pooling, ours.bidirectional, ours.max_length) == ("mean", True, 128)
    st = SentenceTransformer(str(out), device="cpu")
    a = ours.encode(QUERIES[:4])
    b = st.encode(QUERIES[:4], convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # the in-memory soup the search scores is the same model as the written folder
    ev = soup.SoupEvaluator(ings, lambda m: 0.0)
    np.testing.assert_allclose(ev.model_for([0.5, 0.5]).encode(QUERIES[:4]), a, atol=1e-6)


# ---------------------------------------------------------------------------------------------- memory
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from kalm_lib import soup
    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
    paths = sys.argv[1:]
    ings = soup.load_ingredients(paths)
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS mark := current RSS (import peaks forgotten)
    before = status("VmRSS")
    state = soup.average_checkpoints(ings, soup.uniform_weights(len(ings)))
    print(json.dumps({"delta": status("VmHWM") - before, "result_bytes": sum(t.numel() * t.element_size() for t in state.values())}))
""")


def _peak_delta(paths: list[Path]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                         check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_stays_bounded_as_ingredients_grow(tmp_path):
    # a wider tiny decoder (~4.5M params, 18 MB) so a model stands well above the interpreter's RSS noise
    base = EmbeddingModel.tiny_decoder("qwen2", hidden_size=256, intermediate_size=1024, seed=0).save(tmp_path / "b")
    paths = [perturbed_copy(base, tmp_path / f"ft{k}", seed=k) for k in range(6)]
    model_bytes = (base / "model.safetensors").stat().st_size
    two, six = _peak_delta(paths[:2]), _peak_delta(paths)
    assert two["result_bytes"] == six["result_bytes"] > 0.9 * model_bytes
    # 4 more ingredients cost far less than one more model each (a load-all average would add ~4 models)
    assert six["delta"] - two["delta"] < 0.5 * model_bytes, (two, six, model_bytes)
    # float32 buffer + one mapped file ~ 2 models, plus allocator slack (2.72x seen in CI); loading all six
    # ingredients at once would need >= 6 models, so 3.5x still separates streaming from load-all
    assert six["delta"] < 3.5 * model_bytes, (six, model_bytes)


# ---------------------------------------------------------------------------------------------- recipes
def test_pair_retrieval_scorer_matches_independent_mrr(ckpts, scorer):
    model = EmbeddingModel.from_pretrained(ckpts["ft1"])
    result = scorer(model)
    q, d = model.encode(QUERIES), model.encode(DOCS)
    ranks = []
    for i in range(len(QUERIES)):  # position of the right document in a descending sort (no ties here)
        ranks.append(int(np.where(np.argsort(-(q[i] @ d.T), kind="stable") == i)[0][0]) + 1)
    assert result.score == pytest.approx(np.mean([1 / r for r in ranks]))
    assert result.tasks == {"toy": result.score}


def test_greedy_soup_never_below_best_ingredient(ckpts, scorer):
    for names in (["ft1", "ft2", "ft3"], ["base", "seed1", "ft3"], ["ft3", "ft2", "base", "ft1"]):
        ings = soup.load_ingredients([ckpts[n] for n in names])
        ev = soup.SoupEvaluator(ings, scorer)
        singles = ev.ingredient_scores()
        best = soup.greedy_soup(ev, singles=singles)
        assert best.score >= max(s.score for s in singles), names
        assert sum(best.weights) == pytest.approx(1.0)
        # greedy weights are uniform over the kept ingredients, the best one always among them
        kept = [w for w in best.weights if w > 0]
        assert max(kept) - min(kept) <= 1e-3
        assert best.weights[int(np.argmax([s.score for s in singles]))] > 0
        # the reported score is that soup's score (scored afresh, no cache)
        fresh = soup.as_score(scorer(soup.SoupEvaluator(ings, scorer).model_for(best.weights)))
        assert fresh.score == pytest.approx(best.score)


def test_every_evaluation_is_cached_on_disk(ckpts, scorer, tmp_path):
    calls = []

    def counting(model):
        calls.append(1)
        return scorer(model)

    counting.scorer_id = scorer.scorer_id
    ings = soup.load_ingredients([ckpts["ft1"], ckpts["ft2"], ckpts["ft3"]])
    first = soup.dirichlet_search(soup.SoupEvaluator(ings, counting, cache=tmp_path / "c.jsonl"), 4, seed=3)
    n_calls = len(calls)
    assert n_calls == len({tuple(e.weights) for e in first}) and not any(e.cached for e in first)
    again = soup.dirichlet_search(soup.SoupEvaluator(ings, counting, cache=tmp_path / "c.jsonl"), 4, seed=3)
    assert len(calls) == n_calls  # re-run is free
    assert all(e.cached for e in again) and [e.score for e in again] == [e.score for e in first]
    # reordering the ingredients (weights along) hits the same entries
    rev = soup.SoupEvaluator(ings[::-1], counting, cache=tmp_path / "c.jsonl").evaluate(first[1].weights[::-1])
    assert rev.cached and rev.score == first[1].score
    # another scorer id does not
    other = soup.SoupEvaluator(ings, soup.PairRetrievalScorer({"x": (QUERIES[:5], DOCS[:5])}),
                               cache=tmp_path / "c.jsonl").evaluate(first[0].weights)
    assert not other.cached


def test_grid_and_simplex_helpers():
    assert len(soup.grid_points(2, 10)) == 11 and len(soup.grid_points(3, 10)) == 66  # C(12, 2)
    assert all(abs(sum(p) - 1) < 1e-12 and min(p) >= 0 for p in soup.grid_points(3, 4))
    with pytest.raises(soup.SoupError, match="2 or 3 ingredients"):
        soup.grid_points(4, 10)
    assert soup.round_to_simplex([1, 1, 1], 3) == [0.334, 0.333, 0.333]
    assert sum(soup.round_to_simplex([0.1234, 0.5, 2.0], 2)) == pytest.approx(1.0)


def test_optuna_search_explores_the_simplex(ckpts, scorer):
    ings = soup.load_ingredients([ckpts["ft1"], ckpts["ft2"], ckpts["ft3"]])
    evs = soup.optuna_search(soup.SoupEvaluator(ings, scorer), 5, seed=0)
    assert len(evs) == 5 and evs[0].weights == [0.334, 0.333, 0.333]  # uniform first
    assert len({tuple(e.weights) for e in evs}) >= 3
    assert all(abs(sum(e.weights) - 1) < 1e-9 and min(e.weights) >= 0 for e in evs)


def test_cocktail_weights_are_softmax_of_negative_infonce_loss(ckpts):
    pairs = list(zip(QUERIES, DOCS))
    ings = soup.load_ingredients([ckpts["ft1"], ckpts["seed1"]])
    weights, losses = soup.cocktail_weights(ings, pairs, temperature=0.5, batch_size=len(pairs))
    for ing, loss in zip(ings, losses):  # InfoNCE by hand: cross-entropy of the diagonal of cos / tau
        m = EmbeddingModel.from_pretrained(ing.path)
        logits = m.encode(QUERIES).astype(np.float64) @ m.encode(DOCS).astype(np.float64).T / 0.01
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        assert loss == pytest.approx(-np.mean(np.diag(logp)), rel=1e-4)
    expected = np.exp(-np.array(losses) / 0.5)
    np.testing.assert_allclose(weights, expected / expected.sum(), rtol=1e-9)
    assert abs(sum(weights) - 1) < 1e-12
    flat, _ = soup.cocktail_weights(ings, pairs, temperature=1e6, batch_size=len(pairs))
    np.testing.assert_allclose(flat, [0.5, 0.5], atol=1e-5)


# ---------------------------------------------------------------------------------------------- the run + CLI
def _run_dir(ckpts: dict[str, Path], root: Path) -> Path:
    run = root / "run"
    for stage, names in {"pretrain": ["base"], "finetune-seed1": ["ft1"], "finetune-seed2": ["ft2", "ft3"]}.items():
        for step, name in enumerate(names, 1):
            shutil.copytree(ckpts[name], run / "train" / stage / f"checkpoint-{step * 10}")
    dev = run / "dev_pairs.jsonl"
    dev.write_text("".join(json.dumps({"query": q, "pos": [d], "instruction": ""}) + "\n" for q, d in zip(QUERIES, DOCS)))
    held = run / "held_pairs.jsonl"
    held.write_text("".join(json.dumps({"query": d, "pos": [q]}) + "\n" for q, d in zip(QUERIES, DOCS)))
    return run


def test_run_soup_writes_soup_json_and_folder_and_reruns_from_cache(ckpts, tmp_path):
    run = _run_dir(ckpts, tmp_path)
    assert [p.parent.name + "/" + p.name for p in soup.find_ingredients(["train/*/checkpoint-*"], run,
                                                                        last_per_stage=True)] == \
        ["finetune-seed1/checkpoint-10", "finetune-seed2/checkpoint-20", "pretrain/checkpoint-10"]
    assert [p.parent.name + "/" + p.name for p in soup.find_ingredients(
        ["train/finetune-seed2/checkpoint-*@last", "train/finetune*/checkpoint-*"], run)] == \
        ["finetune-seed2/checkpoint-20", "finetune-seed1/checkpoint-10", "finetune-seed2/checkpoint-10"]
    config = soup.SoupConfig(run_dir=str(run), ingredients=["train/*/checkpoint-*@last"], recipe="dirichlet",
                             budget=3, scorer="pairs",
                             pairs_file="dev_pairs.jsonl", heldout_pairs_file="held_pairs.jsonl")
    result = soup.run_soup(config, progress=False)
    record = soup.load_result(run)
    assert record["recipe"] == "dirichlet" and len(record["ingredients"]) == 3
    assert [e["source"] for e in record["evaluations"]] == ["ingredient"] * 3 + ["dirichlet"] * 3
    assert record["chosen"]["score"] == max(e["score"] for e in record["evaluations"])
    assert record["heldout"]["best_ingredient"]["selection_score"] == max(i["selection_score"]
                                                                          for i in record["ingredients"])
    assert record["weights"] == [i["weight"] for i in record["ingredients"]] == result.chosen.weights
    assert set(record["heldout"]) >= {"chosen", "best_ingredient", "uniform", "gain_selection", "gain_heldout"}
    assert record["provenance"]["config"]["recipe"] == "dirichlet"
    folder = run / record["chosen"]["folder"]
    meta = json.loads((folder / "kalm_config.json").read_text())
    assert [i["weight"] for i in meta["soup"]["ingredients"]] == record["weights"]
    again = soup.run_soup(config, progress=False)
    assert all(e.cached for e in again.evaluations) and again.chosen.weights == result.chosen.weights
    figs = soup.figures(again)
    assert figs["weights"].data[0].type == "scatterternary" and len(figs["ingredients"].data) == 2


def test_cli_main(ckpts, tmp_path, capsys):
    run = _run_dir(ckpts, tmp_path)
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(f"run_dir: {run}\ningredients: [train/finetune-seed1/checkpoint-10, train/pretrain/*]\n"
                   "recipe: grid\ngrid_steps: 2\nscorer: pairs\npairs_file: dev_pairs.jsonl\n")
    assert cli_main(["--config", str(cfg), "--no-progress"]) == 0
    record = soup.load_result(run)
    assert [e["weights"] for e in record["evaluations"] if e["source"] == "grid"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    assert "chosen (grid)" in capsys.readouterr().out
    cfg.write_text(f"run_dir: {run}\nrecipe: greedy\nbudjet: 3\n")
    assert cli_main(["--config", str(cfg)]) == 2
    assert "budjet" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_ingredients_are_named(ckpts, tmp_path):
    with pytest.raises(soup.SoupError, match="empty ingredient list"):
        soup.load_ingredients([])
    with pytest.raises(FileNotFoundError, match=r"ingredient 1 \(.*nowhere\).*does not exist"):
        soup.load_ingredients([ckpts["base"], tmp_path / "nowhere"])
    empty = tmp_path / "empty"
    shutil.copytree(ckpts["base"], empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(soup.SoupError, match=r"ingredient 1 .*empty.*no model.safetensors"):
        soup.load_ingredients([ckpts["base"], empty])
    with pytest.raises(FileNotFoundError, match="matches no checkpoint"):
        soup.find_ingredients(["train/*/checkpoint-*"], tmp_path)

    wide = EmbeddingModel.tiny_decoder("qwen2", hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                       seed=0).save(tmp_path / "narrow")
    with pytest.raises(soup.SoupError, match=r"ingredient 2 \(.*narrow\).*hidden_size = 32 vs 64"):
        soup.load_ingredients([ckpts["base"], ckpts["ft1"], wide])
    llama = EmbeddingModel.tiny_decoder("llama", seed=0).save(tmp_path / "llama")
    with pytest.raises(soup.SoupError, match=r"ingredient 1 .*llama.*architectures = \[.LlamaModel.\] vs \[.Qwen2Model.\]"):
        soup.load_ingredients([ckpts["base"], llama])
    last = EmbeddingModel.tiny_decoder("qwen2", seed=0, pooling="last").save(tmp_path / "last")
    with pytest.raises(soup.SoupError, match=r"ingredient 1 .*last.*pooling = 'last' vs 'mean'"):
        soup.load_ingredients([ckpts["base"], last])
    causal = EmbeddingModel.tiny_decoder("qwen2", seed=0, bidirectional=False).save(tmp_path / "causal")
    with pytest.raises(soup.SoupError, match=r"ingredient 1 .*causal.*is_causal"):
        soup.load_ingredients([ckpts["base"], causal])
    half = shutil.copytree(ckpts["base"], tmp_path / "half")
    state = load_file(str(half / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(half / "model.safetensors"))
    with pytest.raises(soup.SoupError, match=r"ingredient 1 .*half.*parameter .* BF16 vs .* F32"):
        soup.load_ingredients([ckpts["base"], half])
    pruned = shutil.copytree(ckpts["base"], tmp_path / "pruned")
    save_file({k: v for k, v in state.items() if k != "norm.weight"}, str(pruned / "model.safetensors"))
    with pytest.raises(soup.SoupError, match=r"ingredient 1 .*pruned.*missing \['norm.weight'\]"):
        soup.load_ingredients([ckpts["base"], pruned])


def test_bad_weights_are_named(ckpts):
    ings = soup.load_ingredients([ckpts["ft1"], ckpts["ft2"]])
    with pytest.raises(soup.SoupError, match="sum to 0.9"):
        soup.average_checkpoints(ings, [0.4, 0.5])
    with pytest.raises(soup.SoupError, match=r"weight of ingredient 1 \(.*ft2\) is -0.5"):
        soup.average_checkpoints(ings, [1.5, -0.5])
    with pytest.raises(soup.SoupError, match=r"weight of ingredient 0 .* is nan"):
        soup.check_weights([float("nan"), 1.0], ings)
    with pytest.raises(soup.SoupError, match="3 weights for 2 ingredients"):
        soup.check_weights([0.2, 0.3, 0.5], ings)
    with pytest.raises(soup.SoupError, match="empty ingredient list"):
        soup.uniform_weights(0)


def test_shipped_soup_configs_load():
    configs = sorted((Path(__file__).resolve().parent.parent / "configs" / "soup").glob("*.yaml"))
    assert {"cpu-demo.yaml", "smoke.yaml"} <= {c.name for c in configs}
    for path in configs:
        cfg = soup.load_config(path)
        assert cfg.recipe in soup.RECIPES
        assert not set(cfg.selection_tasks) & set(cfg.heldout_tasks), path
    from kalm_lib.evaluation.tasks import TASKS_BY_NAME

    for path in configs:
        cfg = soup.load_config(path)
        assert set(cfg.selection_tasks + cfg.heldout_tasks) <= set(TASKS_BY_NAME), path


def test_soup_configs_are_found_by_the_one_resolver_and_take_the_one_override_syntax(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parent.parent / "configs" / "soup" / "smoke.yaml"
    monkeypatch.chdir(tmp_path)   # a notebook's working directory: names and repo-relative paths still resolve
    assert soup.load_config("smoke") == soup.load_config("configs/soup/smoke.yaml") == soup.load_config(path)
    cfg = soup.load_config("smoke", ["budget=7", "cocktail_loss_temperature=5e-2", "heldout_tasks=[]"])
    assert (cfg.budget, cfg.cocktail_loss_temperature, cfg.heldout_tasks) == (7, 0.05, [])
    # the notebook's parameters arrive as a dict of Python values
    cfg = soup.load_config("smoke", {"run_dir": "/tmp/r", "selection_tasks": ["KalmDev-MRPC-en"], "seed": 3})
    assert (cfg.run_dir, cfg.selection_tasks, cfg.seed) == ("/tmp/r", ["KalmDev-MRPC-en"], 3)
    with pytest.raises(FileNotFoundError, match=r"config not found: nope .*known soup configs: \[.*'smoke'"):
        soup.load_config("nope")


def test_result_tables_for_the_notebook(ckpts, tmp_path):
    run = _run_dir(ckpts, tmp_path)
    ings = soup.load_ingredients(soup.find_ingredients(["train/*/checkpoint-*@last"], run))
    table = soup.ingredient_table(ings)
    assert list(table["ingredient"]) == [i.name for i in ings] and set(table["pooling"]) == {"mean"}
    assert list(table["sha256"]) == [sha256(i.path / "model.safetensors")[:12] for i in ings]
    config = soup.SoupConfig(run_dir=str(run), ingredients=["train/*/checkpoint-*@last"], recipe="uniform",
                             scorer="pairs", pairs_file="dev_pairs.jsonl", heldout_pairs_file="held_pairs.jsonl")
    result = soup.run_soup(config, progress=False)
    held = soup.heldout_table(result).set_index("soup")
    assert list(held.index) == ["chosen", "best_ingredient", "uniform"]
    assert held.loc["chosen", "held-apart"] == result.heldout["chosen"]["heldout_score"]
    assert held.loc["best_ingredient", "selection"] == max(i["selection_score"] for i in result.ingredients)
    assert soup.heldout_table(dataclasses.replace(result, heldout={})).empty


def test_heldout_evaluator_shares_the_loaded_model_and_cache(ckpts, scorer, tmp_path):
    ings = soup.load_ingredients([ckpts["ft1"], ckpts["ft2"]])
    ev = soup.SoupEvaluator(ings, scorer, cache=tmp_path / "c.jsonl", decimals=2)
    ev.evaluate([0.5, 0.5])
    other = ev.with_scorer(lambda m: 1.0)
    assert other.template is ev.template and other.cache is ev.cache and other.decimals == 2
    assert other.evaluate([0.5, 0.5]).score == 1.0 and len(ev.history) == 1 and len(other.history) == 1


@pytest.mark.slow  # two real mteb STS evaluations (~15 s on an idle 2-core machine, more under load)
def test_evaluate_scorer_matches_kalm_eval(ckpts, tmp_path):
    """The search's mteb scorer gives the score `kalm_lib.evaluate.run_eval` writes for the same model."""
    from kalm_lib import evaluation as evaluate

    scorer = soup.EvaluateScorer(["KalmDev-STSB-en"], quick=True, quick_cap=60)   # a capped subset, as cpu-demo
    model = EmbeddingModel.from_pretrained(ckpts["ft1"])
    got = scorer(model)
    evaluate.run_eval(str(ckpts["ft1"]), evaluate.EvalConfig(tasks=["KalmDev-STSB-en"], quick=True, quick_cap=60),
                      tmp_path)
    want = evaluate.task_scores(evaluate.load_results([tmp_path]))
    assert got.tasks == {"KalmDev-STSB-en": pytest.approx(float(want["main_score"].iloc[0]), abs=1e-9)}
    assert got.score == got.tasks["KalmDev-STSB-en"] and -100 <= got.score <= 100


def test_quick_cap_reaches_the_scorers_and_their_cache_keys(tmp_path):
    cfg = soup.load_config("cpu-demo", ["quick_cap=60"])
    plain = soup.selection_scorer_for(soup.load_config("cpu-demo", ["quick_cap=null"]))
    capped = soup.selection_scorer_for(cfg)
    assert capped.quick_cap == 60 and capped.scorer_id == plain.scorer_id + ":cap=60"
    assert soup.heldout_scorer_for(cfg).quick_cap == 60
    with pytest.raises(ConfigError, match="quick_cap: must be >= 1"):
        soup.load_config("cpu-demo", ["quick_cap=0"])


def test_a_failed_write_leaves_no_half_written_soup(ckpts, tmp_path):
    ings = soup.load_ingredients([ckpts["ft1"], ckpts["ft2"]])
    out = soup.write_soup(ings, [0.5, 0.5], tmp_path / "soup")
    before = sha256(out / "model.safetensors")
    with pytest.raises(Exception):  # serialisation fails half-way: a non-tensor in the state dict
        soup.write_soup(ings, [0.2, 0.8], out, state_dict={"embed_tokens.weight": torch.zeros(2), "bad": "x"})
    assert sha256(out / "model.safetensors") == before  # the previous soup is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]  # and no temp folder is left
    with pytest.raises(Exception):
        soup.write_soup(ings, [0.2, 0.8], tmp_path / "fresh", state_dict={"bad": "x"})
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("recipe,extra", [("uniform", {}), ("weights", {"weights": [0.5, 0.25, 0.25]}),
                                          ("greedy", {}), ("cocktail", {"cocktail_temperature": 0.1}),
                                          ("optuna", {"budget": 3})])
def test_every_recipe_runs_end_to_end(ckpts, tmp_path, recipe, extra):
    run = _run_dir(ckpts, tmp_path)
    config = soup.SoupConfig(run_dir=str(run), ingredients=["train/*/checkpoint-*@last"], recipe=recipe,
                             scorer="pairs", pairs_file="dev_pairs.jsonl", **extra)
    result = soup.run_soup(config, progress=False)
    singles = [e for e in result.evaluations if e.source == "ingredient"]
    assert len(singles) == 3 and abs(sum(result.chosen.weights) - 1) < 1e-9
    if recipe == "uniform":
        assert result.chosen.weights == [0.334, 0.333, 0.333]
    if recipe == "weights":
        assert result.chosen.weights == [0.5, 0.25, 0.25]
    if recipe in ("greedy", "optuna"):  # both can always fall back to the best ingredient
        assert result.chosen.score >= max(s.score for s in singles)
    if recipe == "cocktail":
        losses = np.array(result.extra["cocktail"]["losses"])
        expected = np.exp(-losses / 0.1) / np.exp(-losses / 0.1).sum()
        np.testing.assert_allclose(result.chosen.weights, soup.round_to_simplex(expected, 3), atol=1e-12)
        assert soup.load_result(run)["cocktail"]["losses"] == list(losses)
    saved = load_file(str(result.folder / "model.safetensors"))
    ings = soup.load_ingredients(soup.find_ingredients(config.ingredients, run))
    again = soup.average_checkpoints(ings, result.chosen.weights)
    assert all(torch.equal(saved[k], again[k]) for k in again)  # the folder holds the chosen soup


def test_figures_fit_the_number_of_ingredients():
    def result(n):
        evs = [soup.Evaluation([1.0 if j == i else 0.0 for j in range(n)], 0.1 * i, {"t": 0.1 * i}, "ingredient")
               for i in range(n)]
        evs.append(soup.Evaluation(soup.round_to_simplex([1] * n), 0.9, {"t": 0.9}, "uniform"))
        ings = [{"name": f"c{i}", "selection_score": 0.1 * i} for i in range(n)]
        return soup.SoupResult(ings, "uniform", evs, evs[-1], {}, None)

    assert [soup.figures(result(n))["weights"].data[0].type for n in (2, 3, 4)] == \
        ["scatter", "scatterternary", "parcoords"]
    bars = soup.figures(result(4))["ingredients"].data[0]
    assert list(bars.x) == ["c0", "c1", "c2", "c3", "soup (uniform)", "uniform soup"]
    assert list(bars.y) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.9, 0.9])
