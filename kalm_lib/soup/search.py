"""Model soup: weighted parameter averaging of EmbeddingModel checkpoints, and a search over the weights.

KaLM-Embedding V2 (DESIGN.md §1.3, stage 3) averages several fine-tuned checkpoints for robustness; which
checkpoints and weights is not public, so this module searches for them against an embedding metric::

    kalm soup --config configs/soup/cpu-demo.yaml

Pieces, each usable alone:

* :func:`average_checkpoints` / :func:`write_soup` (in :mod:`kalm_lib.averaging`): stream N checkpoints (one safetensors file open at a
  time, float32 running mean, memory ~2 models whatever N is) into a normal EmbeddingModel folder whose
  ``kalm_config.json`` records ingredients (path + sha256 of their weights) and weights.
* Recipes: :func:`uniform_weights`, :func:`greedy_soup`, :func:`cocktail_weights` (LM-Cocktail: softmax
  of the negative few-shot InfoNCE loss), and searches over the simplex: :func:`grid_search`,
  :func:`dirichlet_search`, :func:`optuna_search` (TPE over logits mapped to the simplex).
* :class:`SoupEvaluator` scores a weight vector with any scorer (``scorer(model) -> float | {task: score}``)
  and caches every result on disk, keyed by ingredient hashes + rounded weights + scorer id.
* :func:`run_soup` (the CLI): ingredients from globs in a run directory, a recipe, the chosen soup written
  to ``<run_dir>/soup/model`` and everything evaluated to ``<run_dir>/soup/soup.json``, with a held-apart
  check on tasks the search did not use.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from kalm_lib import provenance
# the averaging mechanics (ingredients, checks, streaming average, soup folder) live in kalm_lib.averaging;
# re-exported so ``kalm_lib.soup`` stays the one import for soups
from kalm_lib.soup.averaging import (NOT_COPIED, SETTINGS_KEYS, SETTINGS_SAVED, TOKENIZER_FILES,  # noqa: F401
                                VOLATILE_CONFIG_KEYS, WEIGHTS_FILE, WEIGHTS_INDEX, Ingredient, SoupError,
                                _ingredient_record, _rel, average_checkpoints, check_compatible, check_weights,
                                find_ingredients, load_ingredient, load_ingredients, round_to_simplex,
                                uniform_weights, weights_sha256, write_soup)
from kalm_lib.config import ConfigError, from_dict, load_yaml

SOUP_JSON = "soup/soup.json"
SOUP_MODEL = "soup/model"
SOUP_CACHE = "soup/cache/scores.jsonl"

# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class ScoreResult:
    """A scorer's answer: the main score (higher is better) and per-task scores."""

    score: float
    tasks: dict[str, float] = field(default_factory=dict)


Scorer = Callable[[Any], "float | Mapping[str, float] | ScoreResult"]


def scorer_id(scorer: Any) -> str:
    """The cache identity of a scorer: its ``scorer_id`` attribute, else its qualified name.

    Give a scorer whose behaviour depends on arguments (tasks, data) a ``scorer_id`` that names them,
    or two scorers would share cache entries.
    """
    sid = getattr(scorer, "scorer_id", None)
    if sid:
        return str(sid)
    fn = getattr(scorer, "func", scorer)  # functools.partial
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def as_score(value: Any, where: str = "scorer") -> ScoreResult:
    """Normalise a scorer's return value: a number, a ``{task: score}`` mapping (main = mean) or ScoreResult."""
    if isinstance(value, ScoreResult):
        return value
    if isinstance(value, Mapping):
        tasks = {str(k): float(v) for k, v in value.items()}
        if not tasks:
            raise SoupError(f"{where} returned no task scores")
        return ScoreResult(float(np.mean(list(tasks.values()))), tasks)
    if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool):
        return ScoreResult(float(value), {})
    raise SoupError(f"{where} returned {type(value).__name__}; expected a number, a mapping or ScoreResult")


class PairRetrievalScorer:
    """A cheap, hand-checkable metric: mean reciprocal rank of each query's own document among all documents.

    ``tasks`` maps a task name to ``(queries, documents)`` (document i answers query i); the main score is
    the mean MRR over tasks. Rank = 1 + number of documents scored strictly higher than the right one
    (cosine similarity). Used by tests and smoke runs; real runs score with :class:`EvaluateScorer`.
    """

    def __init__(self, tasks: Mapping[str, tuple[Sequence[str], Sequence[str]]], *, query_prompt: str | None = None,
                 batch_size: int = 64):
        self.tasks = {}
        for name, (queries, docs) in tasks.items():
            if len(queries) != len(docs) or not queries:
                raise SoupError(f"pair task {name!r}: need as many documents as queries (>0), got "
                                f"{len(queries)} and {len(docs)}")
            self.tasks[name] = (list(queries), list(docs))
        self.query_prompt = query_prompt
        self.batch_size = batch_size
        blob = json.dumps([self.tasks, query_prompt], sort_keys=True, ensure_ascii=False).encode()
        self.scorer_id = f"pair-mrr:{hashlib.sha256(blob).hexdigest()[:16]}"

    def __call__(self, model) -> ScoreResult:
        out = {}
        for name, (queries, docs) in self.tasks.items():
            q = model.encode(queries, prompt=self.query_prompt, batch_size=self.batch_size)
            d = model.encode(docs, batch_size=self.batch_size)
            sims = q @ d.T
            own = np.diag(sims)
            ranks = 1 + (sims > own[:, None]).sum(axis=1)
            out[name] = float(np.mean(1.0 / ranks))
        return ScoreResult(float(np.mean(list(out.values()))), out)


class EvaluateScorer:
    """Scores a model on offline mteb dev tasks with :mod:`kalm_lib.evaluate` (real mteb evaluators).

    ``tasks``: offline task names (``kalm_lib.eval_tasks``, e.g. ``KalmDev-STSB-en``); ``quick`` uses each
    task's quick subsample. Tasks are built once and reused for every soup. Main score = mean of the tasks'
    main scores (0-100, as on the leaderboard). Instructions follow the KaLM format (workbench models).
    """

    def __init__(self, tasks: Sequence[str], *, quick: bool = True, batch_size: int = 32,
                 use_instructions: bool = True, seed: int = 42):
        if not tasks:
            raise SoupError("EvaluateScorer needs at least one task name")
        self.tasks = list(tasks)
        self.quick = quick
        self.batch_size = batch_size
        self.use_instructions = use_instructions
        self.seed = seed
        self.scorer_id = (f"mteb:{'quick' if quick else 'full'}:instr={int(use_instructions)}:seed={seed}:"
                          f"{','.join(sorted(self.tasks))}")
        self._tasks = None

    def __call__(self, model) -> ScoreResult:
        import tempfile

        from kalm_lib import evaluation as evaluate  # imported late: tests of the averaging need no mteb

        if self._tasks is None:
            self._tasks = evaluate.resolve_tasks(evaluate.EvalConfig(tasks=self.tasks, quick=self.quick,
                                                                     seed=self.seed))
        encoder = evaluate.MtebEncoder(model, name="kalm/soup", revision="candidate",
                                       use_instructions=self.use_instructions, batch_size=self.batch_size)
        with tempfile.TemporaryDirectory(prefix="kalm-soup-eval-") as out:
            summary = evaluate.evaluate_encoder(encoder, self._tasks, out, batch_size=self.batch_size)
            if summary["errors"]:
                raise SoupError(f"evaluation failed: {summary['errors']}")
            frame = evaluate.task_scores(evaluate.load_results([out]))
        tasks = {str(r["task"]): float(r["main_score"]) for r in frame.to_dict("records")}
        missing = sorted(set(self.tasks) - set(tasks))
        if missing:
            raise SoupError(f"evaluation returned no score for task(s) {missing}")
        return ScoreResult(float(np.mean([tasks[t] for t in self.tasks])), {t: tasks[t] for t in self.tasks})


class ScoreCache:
    """Append-only JSONL cache of soup scores; a re-run finds every evaluated weight vector for free.

    Key: sha256 of (scorer id, sorted ``(ingredient sha256, weight)`` pairs with weight > 0). Zero-weight
    ingredients and ingredient order do not change the soup, so they do not change the key. A torn last
    line (a crash mid-write) is skipped.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(hashes: Sequence[str], weights: Sequence[float], sid: str, decimals: int = 6) -> str:
        pairs = sorted((h, round(float(w), decimals)) for h, w in zip(hashes, weights) if w > 0)
        return hashlib.sha256(json.dumps([sid, pairs]).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        entry = {"key": key, **entry}
        self.entries[key] = entry
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")


@dataclass
class Evaluation:
    """One scored weight vector."""

    weights: list[float]
    score: float
    tasks: dict[str, float]
    source: str          # which recipe proposed it: ingredient | uniform | greedy | cocktail | grid | dirichlet | optuna
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SoupEvaluator:
    """Scores soups (weight vectors) of fixed ingredients with one scorer, caching every result.

    One template model (ingredient 0) is loaded once; each soup is averaged by :func:`average_checkpoints`
    and copied into it, so scoring needs no disk writes. ``history`` lists evaluations in order, cache hits
    included (``cached=True``).
    """

    def __init__(self, ingredients: Sequence[Ingredient], scorer: Scorer, *, cache: ScoreCache | str | os.PathLike
                 | None = None, decimals: int = 3, device: str | None = None):
        if not ingredients:
            raise SoupError("empty ingredient list: a soup needs at least one checkpoint")
        self.ingredients = list(ingredients)
        self.scorer = scorer
        self.scorer_id = scorer_id(scorer)
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.decimals = decimals
        self.device = device
        self.history: list[Evaluation] = []
        self._template = None

    @property
    def template(self):
        if self._template is None:
            from kalm_lib.model import EmbeddingModel

            self._template = EmbeddingModel.from_pretrained(self.ingredients[0].path, device=self.device)
        return self._template

    def model_for(self, weights: Sequence[float]):
        """The template model holding the soup of ``weights`` (reused object: score it before the next call)."""
        state = average_checkpoints(self.ingredients, weights)
        backbone = self.template.backbone
        expected = set(backbone.state_dict())
        if set(state) != expected:
            raise SoupError(f"checkpoint tensor names do not match the loaded backbone's "
                            f"(missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})")
        backbone.load_state_dict(state, strict=True)
        return self.template

    def one_hot(self, i: int) -> list[float]:
        return [1.0 if j == i else 0.0 for j in range(len(self.ingredients))]

    def evaluate(self, weights: Sequence[float], source: str = "given") -> Evaluation:
        """Score the soup of ``weights`` (rounded to the simplex at ``decimals``), from the cache if seen."""
        weights = round_to_simplex(check_weights(weights, self.ingredients, tol=1e-3), self.decimals)
        key = ScoreCache.key([i.sha256 for i in self.ingredients], weights, self.scorer_id)
        hit = self.cache.get(key)
        if hit is not None:
            ev = Evaluation(weights, float(hit["score"]), dict(hit.get("tasks", {})), source, cached=True)
        else:
            result = as_score(self.scorer(self.model_for(weights)), self.scorer_id)
            self.cache.put(key, {"score": result.score, "tasks": result.tasks, "scorer": self.scorer_id,
                                 "ingredients": [i.sha256 for i in self.ingredients], "weights": weights})
            ev = Evaluation(weights, result.score, result.tasks, source)
        self.history.append(ev)
        return ev

    def ingredient_scores(self, progress: bool = False) -> list[Evaluation]:
        """Each ingredient alone (one-hot weights)."""
        return [self.evaluate(self.one_hot(i), "ingredient")
                for i in _bar(range(len(self.ingredients)), progress, "ingredients")]


def _bar(it: Iterable, progress: bool, desc: str, total: int | None = None):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total)


# ---------------------------------------------------------------------------------------------- recipes
def _rank(score: float) -> float:
    """Sort key: a NaN score (a degenerate soup) ranks below every real score."""
    return -math.inf if math.isnan(score) else score


def greedy_soup(evaluator: SoupEvaluator, *, singles: Sequence[Evaluation] | None = None,
                progress: bool = False) -> Evaluation:
    """Greedy soup (Wortsman et al. 2022): ingredients by decreasing score; add each to the uniform soup
    of those kept if the soup's score does not drop. Starts from the best ingredient and only accepts
    non-decreasing steps, so it never returns a soup below its best ingredient on the selection scorer.
    """
    if singles is None:
        singles = evaluator.ingredient_scores(progress)
    order = sorted(range(len(singles)), key=lambda i: -_rank(singles[i].score))
    kept = [order[0]]
    best = singles[order[0]]
    for i in _bar(order[1:], progress, "greedy soup"):
        trial = kept + [i]
        weights = [1.0 / len(trial) if j in trial else 0.0 for j in range(len(singles))]
        ev = evaluator.evaluate(round_to_simplex(weights, evaluator.decimals), "greedy")
        if _rank(ev.score) >= _rank(best.score):
            kept, best = trial, ev
    return Evaluation(best.weights, best.score, best.tasks, "greedy", best.cached)


def grid_points(n: int, steps: int = 10) -> list[list[float]]:
    """Every weight vector with entries in multiples of ``1/steps`` (2 or 3 ingredients)."""
    if n not in (2, 3):
        raise SoupError(f"grid search covers 2 or 3 ingredients (got {n}); use dirichlet or optuna for more")
    if steps < 1:
        raise SoupError(f"grid steps must be >= 1, got {steps}")
    if n == 2:
        return [[i / steps, 1 - i / steps] for i in range(steps + 1)]
    return [[i / steps, j / steps, (steps - i - j) / steps] for i in range(steps + 1) for j in range(steps + 1 - i)]


def grid_search(evaluator: SoupEvaluator, steps: int = 10, *, progress: bool = False) -> list[Evaluation]:
    """Score every grid point of the simplex (2–3 ingredients)."""
    points = grid_points(len(evaluator.ingredients), steps)
    return [evaluator.evaluate(w, "grid") for w in _bar(points, progress, "grid search")]


def dirichlet_search(evaluator: SoupEvaluator, budget: int, *, alpha: float = 1.0, seed: int = 0,
                     progress: bool = False) -> list[Evaluation]:
    """Random search: the uniform soup, then ``budget - 1`` draws from a symmetric Dirichlet(alpha)."""
    if budget < 1:
        raise SoupError(f"search budget must be >= 1, got {budget}")
    if alpha <= 0:
        raise SoupError(f"dirichlet alpha must be > 0, got {alpha}")
    n = len(evaluator.ingredients)
    rng = np.random.default_rng(seed)
    points = [uniform_weights(n)] + [list(rng.dirichlet([alpha] * n)) for _ in range(budget - 1)]
    return [evaluator.evaluate(w, "dirichlet") for w in _bar(points, progress, "dirichlet search")]


def optuna_search(evaluator: SoupEvaluator, budget: int, *, seed: int = 0, logit_range: float = 3.0,
                  progress: bool = False) -> list[Evaluation]:
    """Model-based search: optuna's TPE over logits in ``[-r, r]^N`` mapped to the simplex by softmax.

    The first trial is the uniform soup (all logits 0). Why logits: TPE samples independent bounded
    parameters; softmax turns any of them into a valid weight vector (no rejection, no renormalisation
    bias towards the simplex's centre). Repeated points are cache hits.
    """
    import optuna

    if budget < 1:
        raise SoupError(f"search budget must be >= 1, got {budget}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = len(evaluator.ingredients)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, budget // 3)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({f"logit_{i}": 0.0 for i in range(n)})
    out = []
    for _ in _bar(range(budget), progress, "optuna search"):
        trial = study.ask()
        logits = np.array([trial.suggest_float(f"logit_{i}", -logit_range, logit_range) for i in range(n)])
        weights = np.exp(logits - logits.max())
        ev = evaluator.evaluate(round_to_simplex(weights / weights.sum(), evaluator.decimals), "optuna")
        study.tell(trial, ev.score)
        out.append(ev)
    return out


def read_pairs(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """``(query, first positive)`` pairs from a unified-record JSONL; the query gets its task instruction."""
    from kalm_lib.model import format_query

    pairs = []
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file does not exist: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                query, pos = row["query"], row["pos"][0]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                raise SoupError(f"{path}:{lineno}: not a unified record with query and pos[0] ({e})") from None
            pairs.append((format_query(row.get("instruction") or None, query), pos))
            if limit and len(pairs) >= limit:
                break
    if not pairs:
        raise SoupError(f"{path}: no pairs")
    return pairs


@torch.inference_mode()
def few_shot_loss(model, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16, temperature: float = 0.01) -> float:
    """Mean InfoNCE loss (in-batch negatives, :func:`kalm_lib.losses.info_nce`) of ``model`` on ``pairs``."""
    from kalm_lib.losses import info_nce

    if not pairs:
        raise SoupError("few-shot loss needs at least one (query, positive) pair")
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        q = model.embed([p[0] for p in chunk])
        d = model.embed([p[1] for p in chunk])
        total += float(info_nce(q, d, temperature=temperature)) * len(chunk)
        count += len(chunk)
    return total / count


def cocktail_weights(ingredients: Sequence[Ingredient], pairs: Sequence[tuple[str, str]], *,
                     temperature: float = 5.0, loss_temperature: float = 0.01, batch_size: int = 16,
                     device: str | None = None, progress: bool = False) -> tuple[list[float], list[float]]:
    """LM-Cocktail weights: ``softmax(-loss_i / temperature)`` of each ingredient's few-shot loss.

    The loss is InfoNCE with in-batch negatives on a few dev ``(query, positive)`` pairs (the training
    loss of the recipe, tau = ``loss_temperature``). LM-Cocktail (Xiao et al. 2023) uses temperature 5;
    lower values concentrate the weight on the lowest-loss ingredient. Loads one ingredient at a time.
    Returns ``(weights, losses)``.
    """
    from kalm_lib.model import EmbeddingModel

    if temperature <= 0:
        raise SoupError(f"cocktail temperature must be > 0, got {temperature}")
    losses = []
    for ing in _bar(ingredients, progress, "few-shot loss"):
        model = EmbeddingModel.from_pretrained(ing.path, device=device)
        losses.append(few_shot_loss(model, pairs, batch_size=batch_size, temperature=loss_temperature))
        del model
    weights = torch.softmax(-torch.tensor(losses, dtype=torch.float64) / temperature, dim=0).tolist()
    return weights, losses


# ---------------------------------------------------------------------------------------------- the run
RECIPES = ("uniform", "weights", "greedy", "cocktail", "grid", "dirichlet", "optuna")


@dataclass
class SoupConfig:
    """``kalm soup`` settings (configs/soup/*.yaml). Paths are relative to ``run_dir`` unless absolute."""

    run_dir: str = "runs/latest"
    # folders or globs; "<glob>@last" keeps the last checkpoint of each folder the glob matches in
    ingredients: list[str] = field(default_factory=lambda: ["train/pretrain/checkpoint-*@last",
                                                            "train/finetune*/checkpoint-*"])
    recipe: Literal["uniform", "weights", "greedy", "cocktail", "grid", "dirichlet", "optuna"] = "greedy"
    weights: list[float] | None = None  # recipe "weights": one per ingredient, >= 0, summing to 1
    budget: int = 20                  # soups scored by dirichlet / optuna (ingredients alone not counted)
    grid_steps: int = 10
    dirichlet_alpha: float = 1.0
    seed: int = 0
    decimals: int = 3                 # weights are rounded to this many decimals (cache key)
    scorer: Literal["evaluate", "pairs"] = "evaluate"
    selection_tasks: list[str] = field(default_factory=lambda: ["KalmDev-STSB-en", "KalmDev-SciFact-en"])
    heldout_tasks: list[str] = field(default_factory=lambda: ["KalmDev-MRPC-en", "KalmDev-Banking77-en"])
    quick: bool = True
    pairs_file: str | None = None     # unified-record JSONL: cocktail few-shot pairs / "pairs" scorer
    pairs_limit: int = 64
    heldout_pairs_file: str | None = None
    cocktail_temperature: float = 5.0
    cocktail_loss_temperature: float = 0.01
    output: str = SOUP_MODEL          # soup folder, relative to run_dir
    device: str | None = None


@dataclass
class SoupResult:
    """What :func:`run_soup` did (also written to ``<run_dir>/soup/soup.json``)."""

    ingredients: list[dict[str, Any]]
    recipe: str
    evaluations: list[Evaluation]
    chosen: Evaluation
    heldout: dict[str, Any]
    folder: Path | None
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self):
        """One row per evaluated soup: source, weights per ingredient, score, per-task scores."""
        import pandas as pd

        names = [i["name"] for i in self.ingredients]
        rows = []
        for ev in self.evaluations:
            rows.append({"source": ev.source, **{f"w[{n}]": w for n, w in zip(names, ev.weights)},
                         "score": ev.score, **ev.tasks, "cached": ev.cached})
        return pd.DataFrame(rows)


def _resolve(path: str | None, base: Path) -> Path | None:
    if path is None:
        return None
    return Path(path) if os.path.isabs(path) else base / path


def _pairs_scorer(path: Path, limit: int) -> PairRetrievalScorer:
    pairs = read_pairs(path, limit)
    return PairRetrievalScorer({path.stem: ([q for q, _ in pairs], [d for _, d in pairs])})


def search(evaluator: SoupEvaluator, recipe: str, *, weights: Sequence[float] | None = None, budget: int = 20,
           grid_steps: int = 10, dirichlet_alpha: float = 1.0, seed: int = 0,
           cocktail: Sequence[float] | None = None, progress: bool = True) -> Evaluation:
    """Run a recipe on an evaluator; return the chosen soup. Every ingredient is scored first (the baseline
    each soup is compared with); searches choose their best evaluation (ties: the first found)."""
    singles = evaluator.ingredient_scores(progress)
    n = len(evaluator.ingredients)
    if recipe == "uniform":
        return evaluator.evaluate(uniform_weights(n), "uniform")
    if recipe == "weights":
        if weights is None:
            raise SoupError("recipe 'weights' needs `weights` (one per ingredient, summing to 1)")
        return evaluator.evaluate(check_weights(weights, evaluator.ingredients), "given")
    if recipe == "cocktail":
        if cocktail is None:
            raise SoupError("recipe 'cocktail' needs the cocktail weights (see cocktail_weights)")
        return evaluator.evaluate(cocktail, "cocktail")
    if recipe == "greedy":
        return greedy_soup(evaluator, singles=singles, progress=progress)
    if recipe == "grid":
        found = grid_search(evaluator, grid_steps, progress=progress)
    elif recipe == "dirichlet":
        found = dirichlet_search(evaluator, budget, alpha=dirichlet_alpha, seed=seed, progress=progress)
    elif recipe == "optuna":
        found = optuna_search(evaluator, budget, seed=seed, progress=progress)
    else:
        raise SoupError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    candidates = singles + found
    best = max(candidates, key=lambda e: _rank(e.score))  # max keeps the first of equal scores
    return best


def run_soup(config: SoupConfig, *, scorer: Scorer | None = None, heldout_scorer: Scorer | None = None,
             progress: bool = True) -> SoupResult:
    """Find ingredients, run the recipe, write the chosen soup and ``<run_dir>/soup/soup.json``.

    ``scorer``/``heldout_scorer`` override the config's (``evaluate``: :class:`EvaluateScorer` on
    ``selection_tasks`` / ``heldout_tasks``; ``pairs``: :class:`PairRetrievalScorer` on ``pairs_file`` /
    ``heldout_pairs_file``). The held-apart scorer is applied to the chosen soup, the best single
    ingredient and the uniform soup, to show whether the search over-fitted its selection tasks.
    """
    run_dir = Path(config.run_dir)
    paths = find_ingredients(config.ingredients, run_dir)
    ingredients = load_ingredients(paths)
    if scorer is None:
        if config.scorer == "evaluate":
            scorer = EvaluateScorer(config.selection_tasks, quick=config.quick)
        else:
            if not config.pairs_file:
                raise ConfigError("scorer 'pairs' needs pairs_file (a unified-record JSONL)")
            scorer = _pairs_scorer(_resolve(config.pairs_file, run_dir), config.pairs_limit)
    if heldout_scorer is None:
        if config.scorer == "evaluate" and config.heldout_tasks:
            overlap = sorted(set(config.heldout_tasks) & set(config.selection_tasks))
            if overlap:
                raise ConfigError(f"heldout_tasks {overlap} are also selection tasks: the held-apart check "
                                  "must use tasks the search did not see")
            heldout_scorer = EvaluateScorer(config.heldout_tasks, quick=config.quick)
        elif config.scorer == "pairs" and config.heldout_pairs_file:
            heldout_scorer = _pairs_scorer(_resolve(config.heldout_pairs_file, run_dir), config.pairs_limit)
    evaluator = SoupEvaluator(ingredients, scorer, cache=run_dir / SOUP_CACHE, decimals=config.decimals,
                              device=config.device)
    extra: dict[str, Any] = {}
    cocktail = None
    if config.recipe == "cocktail":
        if not config.pairs_file:
            raise ConfigError("recipe 'cocktail' needs pairs_file (few-shot dev pairs, unified-record JSONL)")
        pairs = read_pairs(_resolve(config.pairs_file, run_dir), config.pairs_limit)
        cocktail, losses = cocktail_weights(ingredients, pairs, temperature=config.cocktail_temperature,
                                            loss_temperature=config.cocktail_loss_temperature,
                                            device=config.device, progress=progress)
        extra["cocktail"] = {"losses": losses, "weights": cocktail, "temperature": config.cocktail_temperature}
    chosen = search(evaluator, config.recipe, weights=config.weights, budget=config.budget,
                    grid_steps=config.grid_steps, dirichlet_alpha=config.dirichlet_alpha, seed=config.seed,
                    cocktail=cocktail, progress=progress)
    singles = evaluator.history[:len(ingredients)]
    heldout = heldout_check(evaluator, chosen, singles, heldout_scorer) if heldout_scorer else {}
    names = [ing.name for ing in ingredients]
    ingredient_rows = [{**_ingredient_record(ing, w, run_dir), "name": n, "selection_score": s.score}
                       for ing, w, n, s in zip(ingredients, chosen.weights, names, singles)]
    folder = write_soup(ingredients, chosen.weights, _resolve(config.output, run_dir),
                        extra={"recipe": config.recipe, "selection_score": chosen.score,
                               "scorer": evaluator.scorer_id}, progress=progress)
    result = SoupResult(ingredient_rows, config.recipe, list(evaluator.history), chosen, heldout, folder, extra)
    write_result(result, run_dir, config=dataclasses.asdict(config), scorer=evaluator.scorer_id,
                 heldout_scorer=scorer_id(heldout_scorer) if heldout_scorer else None)
    return result


def heldout_check(evaluator: SoupEvaluator, chosen: Evaluation, singles: Sequence[Evaluation],
                  heldout_scorer: Scorer) -> dict[str, Any]:
    """Score the chosen soup, the best single ingredient (by selection score) and the uniform soup on
    held-apart tasks. ``gain_*``: chosen minus best ingredient, on the selection and held-apart tasks; a
    selection gain that vanishes held-apart is over-fitting of the weights to the selection tasks."""
    held = SoupEvaluator(evaluator.ingredients, heldout_scorer, cache=evaluator.cache, decimals=evaluator.decimals,
                         device=evaluator.device)
    held._template = evaluator._template  # same ingredients: reuse the loaded model
    best_i = max(range(len(singles)), key=lambda i: _rank(singles[i].score))
    uniform = round_to_simplex(uniform_weights(len(singles)), evaluator.decimals)
    uniform_seen = [e.score for e in evaluator.history if e.weights == uniform]
    rows = {"chosen": (chosen.weights, chosen.score),
            "best_ingredient": (singles[best_i].weights, singles[best_i].score),
            "uniform": (uniform, uniform_seen[0] if uniform_seen else None)}
    out: dict[str, Any] = {"scorer": held.scorer_id}
    for name, (weights, selection) in rows.items():
        ev = held.evaluate(weights, name)
        out[name] = {"weights": ev.weights, "heldout_score": ev.score, "tasks": ev.tasks,
                     "selection_score": selection}
    out["gain_selection"] = chosen.score - singles[best_i].score
    out["gain_heldout"] = out["chosen"]["heldout_score"] - out["best_ingredient"]["heldout_score"]
    return out


def write_result(result: SoupResult, run_dir: Path, **meta: Any) -> Path:
    """``<run_dir>/soup/soup.json`` (atomic): ingredients, chosen weights, every evaluation, held-apart
    scores, and provenance."""
    record = {
        "recipe": result.recipe,
        "ingredients": result.ingredients,
        "weights": result.chosen.weights,
        "chosen": {**result.chosen.as_dict(), "folder": _rel(result.folder, run_dir) if result.folder else None},
        "evaluations": [e.as_dict() for e in result.evaluations],
        "heldout": result.heldout,
        **result.extra,
        "provenance": provenance.collect(meta.pop("config", None), seed=None, **meta),
    }
    return provenance.write(run_dir / SOUP_JSON, record)


def load_result(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``<run_dir>/soup/soup.json``."""
    path = Path(run_dir) / SOUP_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no soup result at {path}; run `kalm soup` first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- figures
def figures(result: SoupResult) -> dict[str, Any]:
    """Plotly figures: score vs weight (2 ingredients: line; 3: ternary; more: parallel coordinates) and
    each ingredient vs the soups (bars, held-apart scores beside the selection scores when present)."""
    import plotly.express as px
    import plotly.graph_objects as go

    names = [i["name"] for i in result.ingredients]
    frame = result.table()
    wcols = [f"w[{n}]" for n in names]
    figs: dict[str, Any] = {}
    soups = frame.drop_duplicates(subset=wcols)
    if len(names) == 2:
        line = soups.sort_values(wcols[0])
        figs["weights"] = px.line(line, x=wcols[0], y="score", markers=True, hover_data=["source"],
                                  title=f"Soup score vs weight of {names[0]} (rest: {names[1]})")
    elif len(names) == 3:
        figs["weights"] = px.scatter_ternary(soups, a=wcols[0], b=wcols[1], c=wcols[2], color="score",
                                             hover_data=["source"], title="Soup score over the weight simplex")
        figs["weights"].update_traces(marker_size=12, cliponaxis=False)  # the vertices are the ingredients
    else:
        figs["weights"] = px.parallel_coordinates(soups, dimensions=wcols + ["score"], color="score",
                                                  title="Evaluated soups: weights and score")
    soup_name = f"soup ({result.recipe})"
    labels = names + [soup_name]
    selection = [s["selection_score"] for s in result.ingredients] + [result.chosen.score]
    uniform = [e for e in result.evaluations if np.allclose(e.weights, uniform_weights(len(names)), atol=1e-3)]
    if len(names) > 1 and (uniform or result.heldout):
        labels.append("uniform soup")
        selection.append(uniform[0].score if uniform else result.heldout["uniform"].get("selection_score"))
    fig = go.Figure(go.Bar(x=labels, y=selection, name="selection tasks"))
    if result.heldout:  # beside the selection bars of the same models (other tasks, so another scale)
        h = result.heldout
        best = names[int(np.argmax(h["best_ingredient"]["weights"]))]
        held = {best: h["best_ingredient"]["heldout_score"], soup_name: h["chosen"]["heldout_score"],
                "uniform soup": h["uniform"]["heldout_score"]}
        fig.add_bar(x=labels, y=[held.get(label) for label in labels], name="held-apart tasks")
    fig.update_layout(title="Ingredients vs soups", yaxis_title="score", barmode="group")
    figs["ingredients"] = fig
    return figs


# ---------------------------------------------------------------------------------------------- CLI
def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> SoupConfig:
    """A :class:`SoupConfig` from YAML (+ ``key=value`` overrides); unknown keys are ConfigError."""
    from kalm_lib.config import apply_overrides

    data = apply_overrides(load_yaml(path), list(overrides))
    config = from_dict(SoupConfig, data, where=str(path))
    if config.recipe == "weights" and config.weights is None:
        raise ConfigError(f"{path}: recipe 'weights' needs `weights`")
    return config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kalm soup", description="Average checkpoints and search soup weights.")
    p.add_argument("--config", required=True, help="YAML (configs/soup/*.yaml)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(argv: list[str]) -> int:
    """``kalm soup --config configs/soup/<name>.yaml [--run-dir DIR] [--set key=value ...]``."""
    args = _parser().parse_args(argv)
    overrides = list(args.set) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        config = load_config(args.config, overrides)
        result = run_soup(config, progress=not args.no_progress)
    except (ConfigError, SoupError, FileNotFoundError) as e:
        print(f"kalm soup: error: {e}", file=sys.stderr)
        return 2
    print(result.table().to_string(index=False))
    print(f"chosen ({result.recipe}): weights {result.chosen.weights} score {result.chosen.score:.4f}")
    if result.heldout:
        print(f"held-apart: chosen {result.heldout['chosen']['heldout_score']:.4f} vs best ingredient "
              f"{result.heldout['best_ingredient']['heldout_score']:.4f}")
    print(f"soup: {result.folder}\nresults: {Path(config.run_dir) / SOUP_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
