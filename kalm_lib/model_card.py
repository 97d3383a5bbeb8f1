"""The model card (``README.md``) of a saved model folder, in the layout sentence-transformers and the Hub read.

YAML front matter (``library_name``, ``pipeline_tag``, ``tags``, ``base_model``, ``language``, ``license``,
``datasets`` when known), then what a reader needs to reuse the model and trust its numbers: architecture and
embedding settings, how to call it with its prompts, the training recipe, the data cards, and the scores known
when it was saved. Everything comes from the model's settings and its ``card`` (``EmbeddingModel.card``,
kept in ``kalm_config.json``; the trainer and the soup fill it): ``base_model``, ``recipe`` (a mapping, e.g.
the training config), ``ingredients`` (a soup's checkpoints: rows with ``name``/``path``, ``weight``, ``sha256``),
``data`` (data card names, or name -> description), ``scores`` (task -> score, or
rows with ``task``/``main_score``), ``language``, ``license``, ``title``. Missing parts say "not recorded".
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import yaml

from kalm_lib.prompts import QUERY_TEMPLATE

__all__ = ["model_card"]


def _front_matter(card: Mapping[str, Any]) -> str:
    meta: dict[str, Any] = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                            "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction",
                                     "kalm-workbench"]}
    if card.get("base_model"):
        meta["base_model"] = str(card["base_model"])
    for key in ("language", "license"):
        if card.get(key):
            meta[key] = card[key]
    data = card.get("data")
    if data:
        meta["datasets"] = sorted(str(d) for d in data)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _score_rows(scores: Any) -> list[tuple[str, str]]:
    if isinstance(scores, Mapping):
        return [(str(k), f"{v:.2f}" if isinstance(v, (int, float)) else str(v)) for k, v in scores.items()]
    rows = []
    for row in scores or []:
        value = row.get("main_score")
        rows.append((str(row.get("task")), f"{value:.2f}" if isinstance(value, (int, float)) else str(value)))
    return rows


def _ingredient_lines(ingredients: Any) -> list[str]:
    """The "Soup ingredients" section: which checkpoints were averaged, with which weight (empty: not a soup)."""
    if not ingredients:
        return []
    lines = ["", "## Soup ingredients", "", "This model is a weighted average of these checkpoints' weights.", "",
             "| ingredient | weight | weights sha256 |", "|---|---|---|"]
    for row in ingredients:
        lines.append(f"| `{row.get('name') or row.get('path')}` | {row.get('weight')} | "
                     f"`{str(row.get('sha256', ''))[:16]}` |")
    return lines


def model_card(settings: Mapping[str, Any], card: Mapping[str, Any] | None = None, *, prompts: Mapping[str, str],
               n_parameters: int | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """The ``README.md`` text of a saved model folder (see the module docstring)."""
    card = dict(card or {})
    title = card.get("title") or "KaLM-workbench embedding model"
    prompt_tokens = "included" if settings.get("include_prompt", True) else "excluded"
    n_task_prompts = sum(1 for k, v in prompts.items() if v and k not in ("query", "document"))
    lines = [_front_matter(card), f"# {title}", "",
             "A text embedding model saved by the KaLM workbench (`kalm_lib.model.EmbeddingModel`): a "
             "sentence-transformers folder that `SentenceTransformer(path)` and `EmbeddingModel.from_pretrained"
             "(path)` load alike.", "", "## Model", "",
             "| | |", "|---|---|",
             f"| base model | {card.get('base_model') or 'not recorded'} |",
             f"| parameters | {n_parameters if n_parameters is not None else 'not recorded'} |",
             f"| embedding dim | {settings.get('embedding_dim')} |",
             f"| attention | {'bidirectional' if settings.get('bidirectional') else 'causal'} |",
             f"| pooling | {settings.get('pooling')} (prompt tokens {prompt_tokens}), L2-normalised, cosine |",
             f"| max tokens | {settings.get('max_length')} |", "",
             "## Usage and instructions", "",
             f"Queries take a task instruction, `{json.dumps(QUERY_TEMPLATE)[1:-1]}`; documents of retrieval / "
             f"reranking take none. `config_sentence_transformers.json` holds {n_task_prompts} ready prompts, keyed "
             "the way sentence-transformers and mteb look them up (`<Task>-query` / `<Task>-document`, `<Task>`, "
             "`<Type>`, `query` / `document`), so `mteb.evaluate(SentenceTransformer(path), tasks)` uses the "
             "prompts `kalm eval` uses.", "", "```python",
             "from sentence_transformers import SentenceTransformer", "model = SentenceTransformer(path)",
             'q = model.encode(["what is a cat?"], prompt_name="Retrieval-query")',
             'd = model.encode(["Cats are small felines."], prompt_name="Retrieval-document")',
             "print(model.similarity(q, d))", "```", "", "## Training recipe", ""]
    recipe = card.get("recipe")
    lines += (["```yaml", yaml.safe_dump(dict(recipe), sort_keys=False, allow_unicode=True).rstrip(), "```"]
              if recipe else ["Not recorded."])
    lines += _ingredient_lines(card.get("ingredients"))
    lines += ["", "## Data", ""]
    data = card.get("data")
    if isinstance(data, Mapping):
        lines += [f"- `{k}`: {v}" for k, v in data.items()]
    else:
        lines += [f"- `{d}` (data card `data_cards/{d}.md`)" for d in data or []] or ["Not recorded."]
    lines += ["", "## Evaluation", ""]
    rows = _score_rows(card.get("scores"))
    lines += (["| task | main score |", "|---|---|", *[f"| {t} | {s} |" for t, s in rows]] if rows
              else ["No scores recorded when this folder was saved (see the run's report)."])
    if extra:
        lines += ["", "## Also recorded", "", "```json", json.dumps(dict(extra), indent=2, default=str,
                                                                      ensure_ascii=False), "```"]
    return "\n".join(lines) + "\n"
