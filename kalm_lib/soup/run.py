"""The soup stage: ``configs/soup/<name>.yaml`` -> the chosen soup folder and ``<run_dir>/soup/soup.json``.

:func:`run_soup` finds the ingredients in a run directory (globs), scores each alone, runs the recipe on the
selection scorer, checks the chosen soup on held-apart tasks (:func:`heldout_check`), writes the soup
folder and the result record. :func:`figures`, :func:`ingredient_table` and :func:`heldout_table` show a
result (notebook 04).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
from safetensors import safe_open

from kalm_lib import atomic, provenance
from kalm_lib.config import ConfigError, from_dict, load_config_data
from kalm_lib.evaluation.run import check_quick_cap
from kalm_lib.model import KALM_CONFIG, read_prompt_table
from kalm_lib.model_card import model_card
from kalm_lib.runtime import batch_size_for, resolve_device
from kalm_lib.soup.averaging import (Ingredient, display_path, find_ingredients, load_ingredients,
                                     round_to_simplex, uniform_weights, write_soup)
from kalm_lib.soup.recipes import best_of, cocktail_weights, search
from kalm_lib.soup.scoring import (EvaluateScorer, Evaluation, PairRetrievalScorer, Scorer, SoupEvaluator,
                                   device_scorer_id, read_pairs, scorer_id)

SOUP_JSON = "soup/soup.json"
SOUP_MODEL = "soup/model"
SOUP_CACHE = "soup/cache/scores.jsonl"


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
    quick_cap: int | None = None      # quick subsets of at most this many items per split (kalm_lib.evaluation)
    pairs_file: str | None = None     # unified-record JSONL: cocktail few-shot pairs / "pairs" scorer
    pairs_limit: int = 64
    heldout_pairs_file: str | None = None
    cocktail_temperature: float = 5.0
    cocktail_loss_temperature: float = 0.01
    output: str = SOUP_MODEL          # soup folder, relative to run_dir
    device: str | None = "auto"       # where soups are scored: "auto"/None (cuda when present), "cpu", "cuda:1"
    batch_size: int = 32              # encode batch size of the scorers on the CPU
    gpu_batch_size: int = 128         # ... and on a GPU


def load_config(spec: str | os.PathLike | dict[str, Any],
                overrides: Sequence[str] | dict[str, Any] | None = None) -> SoupConfig:
    """A :class:`SoupConfig` from ``configs/soup/<name>.yaml``, a YAML path or a dict, plus overrides.

    The file is found by :func:`kalm_lib.config.resolve_config`; overrides are ``key=value`` strings or a
    ``{key: value}`` dict (:func:`kalm_lib.config.apply_overrides`). Unknown keys are a ConfigError.
    """
    data, where = load_config_data(spec, "soup", overrides if isinstance(overrides, dict) else list(overrides or ()))
    config = from_dict(SoupConfig, data, where=where)
    if config.recipe == "weights" and config.weights is None:
        raise ConfigError(f"{where}: recipe 'weights' needs `weights`")
    check_quick_cap(config.quick_cap, where)
    return config


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

    def table(self) -> pd.DataFrame:
        """One row per evaluated soup: source, weights per ingredient, score, per-task scores."""
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


def scoring_batch_size(config: SoupConfig) -> int:
    """The scorers' encode batch size on the config's device (``gpu_batch_size`` on a GPU)."""
    return batch_size_for(resolve_device(config.device), config.batch_size, config.gpu_batch_size)


def selection_scorer_for(config: SoupConfig) -> Scorer:
    """The config's search scorer: EvaluateScorer on ``selection_tasks`` or pair MRR on ``pairs_file``."""
    if config.scorer == "evaluate":
        return EvaluateScorer(config.selection_tasks, quick=config.quick, quick_cap=config.quick_cap,
                              batch_size=scoring_batch_size(config))
    if not config.pairs_file:
        raise ConfigError("scorer 'pairs' needs pairs_file (a unified-record JSONL)")
    return PairRetrievalScorer.from_file(_resolve(config.pairs_file, Path(config.run_dir)), config.pairs_limit,
                                         batch_size=scoring_batch_size(config))


def heldout_scorer_for(config: SoupConfig) -> Scorer | None:
    """The config's held-apart scorer (None when none is configured); its tasks must not be selection tasks."""
    if config.scorer == "evaluate" and config.heldout_tasks:
        overlap = sorted(set(config.heldout_tasks) & set(config.selection_tasks))
        if overlap:
            raise ConfigError(f"heldout_tasks {overlap} are also selection tasks: the held-apart check "
                              "must use tasks the search did not see")
        return EvaluateScorer(config.heldout_tasks, quick=config.quick, quick_cap=config.quick_cap,
                              batch_size=scoring_batch_size(config))
    if config.scorer == "pairs" and config.heldout_pairs_file:
        return PairRetrievalScorer.from_file(_resolve(config.heldout_pairs_file, Path(config.run_dir)),
                                             config.pairs_limit, batch_size=scoring_batch_size(config))
    return None


def _cocktail(config: SoupConfig, ingredients: Sequence[Ingredient], progress: bool) -> tuple[list[float], dict]:
    """LM-Cocktail weights of the config's few-shot pairs, and what soup.json records about them."""
    if not config.pairs_file:
        raise ConfigError("recipe 'cocktail' needs pairs_file (few-shot dev pairs, unified-record JSONL)")
    pairs = read_pairs(_resolve(config.pairs_file, Path(config.run_dir)), config.pairs_limit)
    weights, losses = cocktail_weights(ingredients, pairs, temperature=config.cocktail_temperature,
                                       loss_temperature=config.cocktail_loss_temperature,
                                       device=resolve_device(config.device), progress=progress)
    return weights, {"cocktail": {"losses": losses, "weights": weights, "temperature": config.cocktail_temperature}}


def run_soup(config: SoupConfig, *, scorer: Scorer | None = None, heldout_scorer: Scorer | None = None,
             progress: bool = True) -> SoupResult:
    """Find ingredients, run the recipe, write the chosen soup and ``<run_dir>/soup/soup.json``.

    ``scorer``/``heldout_scorer`` override the config's (:func:`selection_scorer_for`,
    :func:`heldout_scorer_for`).
    The held-apart scorer is applied to the chosen soup, the best single ingredient and the uniform soup,
    to show whether the search over-fitted its selection tasks. Config errors are raised before any scoring.
    """
    run_dir = Path(config.run_dir)
    ingredients = load_ingredients(find_ingredients(config.ingredients, run_dir))
    scorer = selection_scorer_for(config) if scorer is None else scorer
    held_scorer = heldout_scorer_for(config) if heldout_scorer is None else heldout_scorer
    evaluator = SoupEvaluator(ingredients, scorer, cache=run_dir / SOUP_CACHE, decimals=config.decimals,
                              device=config.device)
    cocktail, extra = _cocktail(config, ingredients, progress) if config.recipe == "cocktail" else (None, {})
    chosen = search(evaluator, config.recipe, weights=config.weights, budget=config.budget,
                    grid_steps=config.grid_steps, dirichlet_alpha=config.dirichlet_alpha, seed=config.seed,
                    cocktail=cocktail, progress=progress)
    singles = evaluator.history[:len(ingredients)]
    heldout = heldout_check(evaluator, chosen, singles, held_scorer) if held_scorer else {}
    ingredient_rows = [{**ing.record(w, run_dir), "name": ing.name, "selection_score": s.score}
                       for ing, w, s in zip(ingredients, chosen.weights, singles)]
    folder = write_soup(ingredients, chosen.weights, _resolve(config.output, run_dir),
                        extra={"recipe": config.recipe, "selection_score": chosen.score,
                               "scorer": evaluator.scorer_id}, progress=progress)
    result = SoupResult(ingredient_rows, config.recipe, list(evaluator.history), chosen, heldout, folder, extra)
    write_model_card(result, config, ingredients)  # the soup's own README.md, not ingredient 0's copied one
    write_result(result, run_dir, config=dataclasses.asdict(config), scorer=evaluator.scorer_id,
                 heldout_scorer=device_scorer_id(scorer_id(held_scorer), evaluator.device) if held_scorer else None,
                 device=evaluator.device)
    return result


def heldout_check(evaluator: SoupEvaluator, chosen: Evaluation, singles: Sequence[Evaluation],
                  heldout_scorer: Scorer) -> dict[str, Any]:
    """Score the chosen soup, the best single ingredient (by selection score) and the uniform soup on
    held-apart tasks. ``gain_*``: chosen minus best ingredient, on the selection and held-apart tasks; a
    selection gain that vanishes held-apart is over-fitting of the weights to the selection tasks."""
    held = evaluator.with_scorer(heldout_scorer)
    best = best_of(singles)
    uniform = round_to_simplex(uniform_weights(len(singles)), evaluator.decimals)
    uniform_seen = [e.score for e in evaluator.history if e.weights == uniform]
    rows = {"chosen": (chosen.weights, chosen.score),
            "best_ingredient": (best.weights, best.score),
            "uniform": (uniform, uniform_seen[0] if uniform_seen else None)}
    out: dict[str, Any] = {"scorer": held.scorer_id}
    for name, (weights, selection) in rows.items():
        ev = held.evaluate(weights, name)
        out[name] = {"weights": ev.weights, "heldout_score": ev.score, "tasks": ev.tasks,
                     "selection_score": selection}
    out["gain_selection"] = chosen.score - best.score
    out["gain_heldout"] = out["chosen"]["heldout_score"] - out["best_ingredient"]["heldout_score"]
    return out


def soup_card(result: SoupResult, config: SoupConfig, ingredients: Sequence[Ingredient]) -> dict[str, Any]:
    """The model-card data of a soup (:func:`kalm_lib.model_card.model_card`): title, the recipe (soup recipe,
    scorer, selection and held-apart tasks), its ingredients with their weights, and its scores. What the
    ingredients' own cards agree on (base model, language, licence) carries over; their data cards are joined."""
    cards = [dict(ing.settings.get("card") or {}) for ing in ingredients]
    card: dict[str, Any] = {key: cards[0][key] for key in ("base_model", "language", "license")
                            if cards and cards[0].get(key) and all(c.get(key) == cards[0][key] for c in cards)}
    data = sorted({str(d) for c in cards for d in (c.get("data") or [])})
    selection = config.selection_tasks if config.scorer == "evaluate" else [f"pairs: {config.pairs_file}"]
    heldout = (config.heldout_tasks if config.scorer == "evaluate" else
               [f"pairs: {config.heldout_pairs_file}"] if config.heldout_pairs_file else [])
    card.update(title=f"Model soup of {len(ingredients)} checkpoints (recipe {result.recipe})",
                ingredients=[{"name": row["name"], "path": row["path"], "weight": row["weight"],
                              "sha256": row["sha256"], "selection_score": row["selection_score"]}
                             for row in result.ingredients],
                recipe={"soup_recipe": result.recipe, "weights": list(result.chosen.weights),
                        "scorer": config.scorer, "selection_tasks": list(selection), "heldout_tasks": list(heldout),
                        "quick": config.quick, **({"search_budget": config.budget}
                                                  if result.recipe in ("dirichlet", "optuna") else {})},
                **({"data": data} if data else {}))
    scores = [{"task": "selection score (the tasks the weights were chosen on: in-sample)",
               "main_score": result.chosen.score}]
    for name in ("chosen", "best_ingredient", "uniform"):
        if isinstance(result.heldout.get(name), dict):
            scores.append({"task": f"held-apart score, {name.replace('_', ' ')}",
                           "main_score": result.heldout[name]["heldout_score"]})
    card["scores"] = scores
    return card


def write_model_card(result: SoupResult, config: SoupConfig, ingredients: Sequence[Ingredient]) -> Path | None:
    """Write the soup folder's own ``README.md`` (:func:`soup_card` through :func:`kalm_lib.model_card.model_card`)
    in place of the card copied from ingredient 0; None when no folder was written."""
    if result.folder is None:
        return None
    folder = Path(result.folder)
    saved = json.loads((folder / KALM_CONFIG).read_text())
    settings = {k: v for k, v in saved.items() if k not in ("soup", "card")}
    return atomic.write_text(folder / "README.md", model_card(
        settings, soup_card(result, config, ingredients), prompts=read_prompt_table(folder),
        n_parameters=_n_parameters(folder),
        # the ingredients are in the card's own table (with paths relative to the run dir, which moves)
        extra={"soup": {k: v for k, v in (saved.get("soup") or {}).items() if k != "ingredients"}}))


def _n_parameters(folder: Path) -> int | None:
    """Number of parameters in the folder's safetensors file(s), read from their headers (no tensor loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as g:
            total += sum(int(np.prod(g.get_slice(k).get_shape())) for k in g.keys())
    return total if files else None


def write_result(result: SoupResult, run_dir: Path, **meta: Any) -> Path:
    """``<run_dir>/soup/soup.json`` (atomic): ingredients, chosen weights, every evaluation, held-apart
    scores, and provenance."""
    record = {
        "recipe": result.recipe,
        "ingredients": result.ingredients,
        "weights": result.chosen.weights,
        "chosen": {**result.chosen.as_dict(),
                   "folder": display_path(result.folder, run_dir) if result.folder else None},
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


# ---------------------------------------------------------------------------------------------- showing a result
def ingredient_table(ingredients: Sequence[Ingredient]) -> pd.DataFrame:
    """One row per ingredient: name, path, short weight hash and the embedding settings that must agree."""
    return pd.DataFrame([{"ingredient": i.name, "path": str(i.path), "sha256": i.sha256[:12],
                          "pooling": i.settings.get("pooling"), "bidirectional": i.settings.get("bidirectional"),
                          "max_length": i.settings.get("max_length")} for i in ingredients])


def heldout_table(result: SoupResult) -> pd.DataFrame:
    """The held-apart check as a table (chosen soup, best ingredient, uniform soup); empty without one."""
    h = result.heldout
    if not h:
        return pd.DataFrame(columns=["soup", "weights", "selection", "held-apart"])
    return pd.DataFrame([{"soup": k, "weights": h[k]["weights"], "selection": h[k]["selection_score"],
                          "held-apart": h[k]["heldout_score"], **h[k]["tasks"]}
                         for k in ("chosen", "best_ingredient", "uniform")])


def figures(result: SoupResult) -> dict[str, Any]:
    """Plotly figures: score vs weight (2 ingredients: line; 3: ternary; more: parallel coordinates) and
    each ingredient vs the soups (bars, held-apart scores beside the selection scores when present)."""
    import plotly.express as px  # third-party, only the figures need it
    import plotly.graph_objects as go

    names = [i["name"] for i in result.ingredients]
    wcols = [f"w[{n}]" for n in names]
    soups = result.table().drop_duplicates(subset=wcols)
    figs: dict[str, Any] = {}
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

