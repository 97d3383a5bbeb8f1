"""Model soup: weighted parameter averaging of EmbeddingModel checkpoints, and a search over the weights.

KaLM-Embedding V2 (DESIGN.md §1.3, stage 3) averages several fine-tuned checkpoints for robustness; which
checkpoints and weights is not public, so this package searches for them against an embedding metric::

    kalm soup --config cpu-demo          # configs/soup/cpu-demo.yaml

Modules, each usable alone:

* :mod:`~kalm_lib.soup.averaging`: ingredients (checkpoint folders + weight hashes), the compatibility
  checks, weights on the simplex, the streaming average (memory ~2 models whatever N is) and the soup folder.
* :mod:`~kalm_lib.soup.scoring`: scorers (``scorer(model) -> float | {task: score}``), the on-disk score
  cache and :class:`SoupEvaluator` (soups scored on a ``device``: ``auto`` = cuda when present).
* :mod:`~kalm_lib.soup.recipes`: uniform, given weights, greedy, LM-Cocktail, grid / Dirichlet / optuna search.
* :mod:`~kalm_lib.soup.run`: :class:`SoupConfig`, :func:`run_soup` (with the held-apart check), soup.json,
  figures and tables. :mod:`~kalm_lib.soup.cli` is ``kalm soup``.
"""

from __future__ import annotations

from kalm_lib.soup.averaging import (Ingredient, SoupError, average_checkpoints, check_compatible, check_weights,
                                     find_ingredients, load_ingredient, load_ingredients, round_to_simplex,
                                     uniform_weights, weights_sha256, write_soup)
from kalm_lib.soup.recipes import (RECIPES, best_of, cocktail_weights, dirichlet_search, few_shot_loss, greedy_soup,
                                   grid_points, grid_search, optuna_search, search)
from kalm_lib.soup.run import (SOUP_CACHE, SOUP_JSON, SOUP_MODEL, SoupConfig, SoupResult, figures, heldout_check,
                               heldout_scorer_for, heldout_table, ingredient_table, load_config, load_result,
                               run_soup, scoring_batch_size, selection_scorer_for, write_result)
from kalm_lib.soup.scoring import (EvaluateScorer, Evaluation, PairRetrievalScorer, ScoreCache, Scorer, ScoreResult,
                                   SoupEvaluator, as_score, read_pairs, scorer_id)

__all__ = [
    # averaging
    "SoupError", "Ingredient", "load_ingredient", "load_ingredients", "find_ingredients", "check_compatible",
    "check_weights", "uniform_weights", "round_to_simplex", "weights_sha256", "average_checkpoints", "write_soup",
    # scoring
    "Scorer", "ScoreResult", "scorer_id", "as_score", "read_pairs", "PairRetrievalScorer", "EvaluateScorer",
    "ScoreCache", "Evaluation", "SoupEvaluator",
    # recipes
    "RECIPES", "best_of", "greedy_soup", "grid_points", "grid_search", "dirichlet_search", "optuna_search",
    "few_shot_loss", "cocktail_weights", "search",
    # the run
    "SOUP_JSON", "SOUP_MODEL", "SOUP_CACHE", "SoupConfig", "load_config", "SoupResult", "scoring_batch_size",
    "selection_scorer_for", "heldout_scorer_for", "run_soup", "heldout_check", "write_result", "load_result", "ingredient_table",
    "heldout_table", "figures",
]
