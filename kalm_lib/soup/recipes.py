"""Soup recipes: which weights to try, and which soup to keep.

Fixed recipes: the uniform soup, given weights, :func:`greedy_soup` (Wortsman et al. 2022) and
:func:`cocktail_weights` (LM-Cocktail: softmax of the negative few-shot InfoNCE loss). Searches over the
weight simplex: :func:`grid_search`, :func:`dirichlet_search` and :func:`optuna_search` (TPE over logits).
:func:`search` runs any of them on a :class:`~kalm_lib.soup.scoring.SoupEvaluator` and returns the chosen soup.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from kalm_lib.losses import info_nce
from kalm_lib.model import EmbeddingModel
from kalm_lib.runtime import progress_bar
from kalm_lib.soup.averaging import Ingredient, SoupError, check_weights, round_to_simplex, uniform_weights
from kalm_lib.soup.scoring import Evaluation, SoupEvaluator

RECIPES = ("uniform", "weights", "greedy", "cocktail", "grid", "dirichlet", "optuna")


def _rank(score: float) -> float:
    """Sort key: a NaN score (a degenerate soup) ranks below every real score."""
    return -math.inf if math.isnan(score) else score


def best_of(evaluations: Sequence[Evaluation]) -> Evaluation:
    """The highest-scoring evaluation (NaN lowest; ties: the first found)."""
    return max(evaluations, key=lambda e: _rank(e.score))  # max keeps the first of equal scores


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
    for i in progress_bar()(order[1:], desc="greedy soup", disable=not progress):
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
    return [evaluator.evaluate(w, "grid") for w in progress_bar()(points, desc="grid search", disable=not progress)]


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
    return [evaluator.evaluate(w, "dirichlet")
            for w in progress_bar()(points, desc="dirichlet search", disable=not progress)]


def optuna_search(evaluator: SoupEvaluator, budget: int, *, seed: int = 0, logit_range: float = 3.0,
                  progress: bool = False) -> list[Evaluation]:
    """Model-based search: optuna's TPE over logits in ``[-r, r]^N`` mapped to the simplex by softmax.

    The first trial is the uniform soup (all logits 0). Why logits: TPE samples independent bounded
    parameters; softmax turns any of them into a valid weight vector (no rejection, no renormalisation
    bias towards the simplex's centre). Repeated points are cache hits.
    """
    import optuna  # third-party, only this recipe needs it (and importing it sets up its logging)

    if budget < 1:
        raise SoupError(f"search budget must be >= 1, got {budget}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = len(evaluator.ingredients)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, budget // 3)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({f"logit_{i}": 0.0 for i in range(n)})
    out = []
    for _ in progress_bar()(range(budget), desc="optuna search", disable=not progress):
        trial = study.ask()
        logits = np.array([trial.suggest_float(f"logit_{i}", -logit_range, logit_range) for i in range(n)])
        weights = np.exp(logits - logits.max())
        ev = evaluator.evaluate(round_to_simplex(weights / weights.sum(), evaluator.decimals), "optuna")
        study.tell(trial, ev.score)
        out.append(ev)
    return out


@torch.inference_mode()
def few_shot_loss(model, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16, temperature: float = 0.01) -> float:
    """Mean InfoNCE loss (in-batch negatives, :func:`kalm_lib.losses.info_nce`) of ``model`` on ``pairs``."""
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
    if temperature <= 0:
        raise SoupError(f"cocktail temperature must be > 0, got {temperature}")
    losses = []
    for ing in progress_bar()(ingredients, desc="few-shot loss", disable=not progress):
        model = EmbeddingModel.from_pretrained(ing.path, device=device)
        losses.append(few_shot_loss(model, pairs, batch_size=batch_size, temperature=loss_temperature))
        del model
    weights = torch.softmax(-torch.tensor(losses, dtype=torch.float64) / temperature, dim=0).tolist()
    return weights, losses


def search(evaluator: SoupEvaluator, recipe: str, *, weights: Sequence[float] | None = None, budget: int = 20,
           grid_steps: int = 10, dirichlet_alpha: float = 1.0, seed: int = 0,
           cocktail: Sequence[float] | None = None, progress: bool = True) -> Evaluation:
    """Run a recipe on an evaluator; return the chosen soup. Every ingredient is scored first (the baseline
    each soup is compared with); searches choose their best evaluation, ingredients alone included (ties:
    the first found)."""
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
    return best_of(singles + found)
