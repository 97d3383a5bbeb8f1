"""Scoring soups: scorers (a model -> a score), the on-disk score cache, and :class:`SoupEvaluator`.

A scorer is any callable ``scorer(model) -> float | {task: score} | ScoreResult`` (higher is better).
:class:`PairRetrievalScorer` is a cheap, hand-checkable metric for tests and smoke runs;
:class:`EvaluateScorer` runs the offline mteb dev tasks of :mod:`kalm_lib.evaluation`.
:class:`SoupEvaluator` scores weight vectors of fixed ingredients with one scorer, caching every result
keyed by the ingredients' weight hashes, the rounded weights and the scorer's id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kalm_lib import evaluation, locking
from kalm_lib.model import EmbeddingModel, format_query
from kalm_lib.runtime import progress_bar, resolve_device
from kalm_lib.soup.averaging import Ingredient, SoupError, average_checkpoints, check_weights, round_to_simplex


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


def read_pairs(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """``(query, first positive)`` pairs from a unified-record JSONL; the query gets its task instruction."""
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

    @classmethod
    def from_file(cls, path: str | os.PathLike, limit: int | None = None, *,
                  batch_size: int = 64) -> PairRetrievalScorer:
        """One task (named after the file) of the :func:`read_pairs` pairs of a unified-record JSONL."""
        pairs = read_pairs(path, limit)
        return cls({Path(path).stem: ([q for q, _ in pairs], [d for _, d in pairs])}, batch_size=batch_size)

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
    """Scores a model on offline mteb dev tasks with :mod:`kalm_lib.evaluation` (real mteb evaluators).

    ``tasks``: offline task names (``kalm_lib.evaluation.tasks``, e.g. ``KalmDev-STSB-en``); ``quick`` uses
    each task's quick subsample (``quick_cap``: at most that many items per split). Tasks are built once and
    reused for every soup. Main score = mean of the tasks' main scores (0-100, as on the leaderboard). Instructions follow the KaLM format (workbench models).
    """

    def __init__(self, tasks: Sequence[str], *, quick: bool = True, quick_cap: int | None = None,
                 batch_size: int = 32, use_instructions: bool = True, seed: int = 42):
        if not tasks:
            raise SoupError("EvaluateScorer needs at least one task name")
        self.tasks = list(tasks)
        self.quick, self.quick_cap = quick, quick_cap
        self.batch_size = batch_size
        self.use_instructions = use_instructions
        self.seed = seed
        self.scorer_id = (f"mteb:{'quick' if quick else 'full'}:instr={int(use_instructions)}:seed={seed}:"
                          f"{','.join(sorted(self.tasks))}" + (f":cap={quick_cap}" if quick and quick_cap else ""))
        self._tasks = None

    def __call__(self, model) -> ScoreResult:
        if self._tasks is None:
            self._tasks = evaluation.resolve_tasks(evaluation.EvalConfig(tasks=self.tasks, quick=self.quick,
                                                                         quick_cap=self.quick_cap, seed=self.seed))
        encoder = evaluation.MtebEncoder(model, name="kalm/soup", revision="candidate",
                                         use_instructions=self.use_instructions, batch_size=self.batch_size)
        with tempfile.TemporaryDirectory(prefix="kalm-soup-eval-") as out:
            summary = evaluation.evaluate_encoder(encoder, self._tasks, out, batch_size=self.batch_size)
            if summary["errors"]:
                raise SoupError(f"evaluation failed: {summary['errors']}")
            frame = evaluation.task_scores(evaluation.load_results([out]))
        tasks = {str(r["task"]): float(r["main_score"]) for r in frame.to_dict("records")}
        missing = sorted(set(self.tasks) - set(tasks))
        if missing:
            raise SoupError(f"evaluation returned no score for task(s) {missing}")
        return ScoreResult(float(np.mean([tasks[t] for t in self.tasks])), {t: tasks[t] for t in self.tasks})


class ScoreCache:
    """Append-only JSONL cache of soup scores; a re-run finds every evaluated weight vector for free.

    Key: sha256 of (scorer id, sorted ``(ingredient sha256, weight)`` pairs with weight > 0). Zero-weight
    ingredients and ingredient order do not change the soup, so they do not change the key. Entries are
    appended (not rewritten: a search adds one entry per soup, and rewriting the file each time would cost
    O(n^2)) under the cache's lock (:mod:`kalm_lib.locking`, ``<cache>.lock``): every append first reads what other
    processes appended since, so concurrent searches sharing a cache keep all entries and see each other's. A torn
    last line (a process killed mid-append) is skipped on reading and closed with a newline before the next append.
    """

    LOCK_WAIT_S = 600.0  # an append holds the lock for milliseconds; waiting long only matters for a stale lock

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        self._offset = 0  # bytes of the file already read (up to the last complete line)
        self._read_new()

    def _read_new(self) -> None:
        """Add the complete lines appended to the file since the last read."""
        if not (self.path and self.path.is_file()):
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                entry = json.loads(line.decode("utf-8"))
                self.entries[entry["key"]] = entry
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                continue

    @staticmethod
    def key(hashes: Sequence[str], weights: Sequence[float], sid: str, decimals: int = 6) -> str:
        """The cache key of a soup: see the class docstring."""
        pairs = sorted((h, round(float(w), decimals)) for h, w in zip(hashes, weights) if w > 0)
        return hashlib.sha256(json.dumps([sid, pairs]).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key`` (this process's or, once read, another's), or None."""
        if key not in self.entries:
            self._read_new()
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` under ``key`` (in memory, and appended to the file under its lock when there is one)."""
        entry = {"key": key, **entry}
        self.entries[key] = entry
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locking.hold(self.path.with_name(self.path.name + ".lock"), what=f"soup score cache {self.path}",
                          wait_s=self.LOCK_WAIT_S):
            self._read_new()
            self.entries[key] = entry
            with open(self.path, "ab") as f:
                torn = f.tell() > self._offset  # a killed writer's partial line: end it, so ours stays whole
                f.write((b"\n" if torn else b"") + (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                self._offset = f.tell()


@dataclass
class Evaluation:
    """One scored weight vector."""

    weights: list[float]
    score: float
    tasks: dict[str, float]
    source: str          # which recipe proposed it: ingredient | uniform | greedy | cocktail | grid | dirichlet | optuna
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for soup.json)."""
        return dataclasses.asdict(self)


def device_scorer_id(sid: str, device: str) -> str:
    """The cache identity of a scorer's scores on ``device``: a score computed on a GPU (other kernels, other
    rounding) is its own entry, ``<scorer id>@cuda``; CPU scores keep the bare scorer id."""
    kind = str(device).split(":")[0]
    return sid if kind == "cpu" else f"{sid}@{kind}"


class SoupEvaluator:
    """Scores soups (weight vectors) of fixed ingredients with one scorer, caching every result.

    One template model (ingredient 0) is loaded once on ``device`` (``"auto"``: cuda when present); each soup
    is averaged by :func:`~kalm_lib.soup.averaging.average_checkpoints` (on the CPU, float32) and copied into
    it, so scoring needs no disk writes. ``history`` lists evaluations in order, cache hits included
    (``cached=True``).
    """

    def __init__(self, ingredients: Sequence[Ingredient], scorer: Scorer, *, cache: ScoreCache | str | os.PathLike
                 | None = None, decimals: int = 3, device: str | None = "auto"):
        if not ingredients:
            raise SoupError("empty ingredient list: a soup needs at least one checkpoint")
        self.ingredients = list(ingredients)
        self.scorer = scorer
        self.device = resolve_device(device)
        self.scorer_id = device_scorer_id(scorer_id(scorer), self.device)
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.decimals = decimals
        self.history: list[Evaluation] = []
        self._template = None

    @property
    def template(self) -> EmbeddingModel:
        """Ingredient 0, loaded on first use; every soup's weights are copied into it."""
        if self._template is None:
            self._template = EmbeddingModel.from_pretrained(self.ingredients[0].path, device=self.device)
        return self._template

    def with_scorer(self, scorer: Scorer) -> SoupEvaluator:
        """Another evaluator of the same ingredients (same cache, rounding and loaded model), own history."""
        other = SoupEvaluator(self.ingredients, scorer, cache=self.cache, decimals=self.decimals, device=self.device)
        other._template = self._template
        return other

    def model_for(self, weights: Sequence[float]) -> EmbeddingModel:
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
        """The weights of ingredient ``i`` alone."""
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
        indices = progress_bar()(range(len(self.ingredients)), desc="ingredients", disable=not progress)
        return [self.evaluate(self.one_hot(i), "ingredient") for i in indices]
