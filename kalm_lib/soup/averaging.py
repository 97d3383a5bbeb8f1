"""Weighted parameter averaging of EmbeddingModel checkpoints: the mechanics under :mod:`kalm_lib.soup`.

Ingredients (checkpoint folders, their safetensors files and weight hashes), the compatibility checks that make
an average meaningful (same tensors, shapes, tokenizer and embedding settings), weights on the simplex, the
streaming average (one safetensors file open at a time, float32 running mean: ~2 models of memory whatever N is)
and the atomic write of the soup as a normal EmbeddingModel folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kalm_lib import atomic, provenance
from kalm_lib.model import read_saved_settings  # the reader EmbeddingModel.from_pretrained uses
from kalm_lib.runtime import progress_bar

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# config.json keys that do not change what the network computes (differences are not an error).
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                        "output_attentions", "output_hidden_states", "return_dict")
# kalm_config.json settings that must agree: a soup of mean- and last-pooled models means nothing.
SETTINGS_KEYS = ("pooling", "bidirectional", "max_length", "include_prompt", "normalize", "embedding_dim",
                 "prompts")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model",
                   "tokenizer.model", "spiece.model")
# Files of a checkpoint folder not copied into the soup folder: weights (re-written) and trainer state.
NOT_COPIED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt",
              "trainer_state*", "training_args*", "optimizer*", "scheduler*", "rng_state*", "kalm_config.json",
              "metrics*", "provenance.json")
SETTINGS_SAVED = ("pooling", "bidirectional", "max_length", "prompts", "include_prompt", "normalize",
                  "embedding_dim", "query_template")


class SoupError(ValueError):
    """Ingredients that cannot be souped, or weights that are not a point of the simplex; names the culprit."""


# ---------------------------------------------------------------------------------------------- ingredients
@dataclass(frozen=True)
class Ingredient:
    """One checkpoint folder (an EmbeddingModel / sentence-transformers folder with safetensors weights)."""

    index: int
    path: Path
    weight_files: tuple[Path, ...]
    sha256: str                      # of the weight files (concatenated in name order)
    settings: dict[str, Any]         # pooling, bidirectional, max_length, ... (kalm_config.json)
    config: dict[str, Any]           # config.json of the backbone

    @property
    def label(self) -> str:
        return f"ingredient {self.index} ({self.path})"

    @property
    def name(self) -> str:
        """A short display name: the last two path parts (``stage/checkpoint-40``)."""
        return "/".join(self.path.parts[-2:])

    def record(self, weight: float, base: Path | None = None) -> dict[str, Any]:
        """``{path, sha256, weight}`` as a soup records its ingredients (path relative to ``base`` if under it)."""
        return {"path": display_path(self.path, base), "sha256": self.sha256, "weight": weight}


def _weight_files(folder: Path, label: str) -> tuple[Path, ...]:
    if (folder / WEIGHTS_FILE).is_file():
        return (folder / WEIGHTS_FILE,)
    if (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text())
        files = tuple(sorted({folder / f for f in index.get("weight_map", {}).values()}))
        missing = [str(f) for f in files if not f.is_file()]
        if not files or missing:
            raise SoupError(f"{label}: {WEIGHTS_INDEX} names missing shard(s) {missing or '(none listed)'}")
        return files
    raise SoupError(f"{label}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX}) in the folder; only safetensors "
                    f"checkpoints can be souped (found: {sorted(p.name for p in folder.iterdir())[:12]})")


def weights_sha256(files: Sequence[Path]) -> str:
    """sha256 of a checkpoint's weight files (one file: that file's sha256)."""
    if len(files) == 1:
        return provenance.sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(provenance.sha256_file(f).encode())
    return h.hexdigest()


def load_ingredient(path: str | os.PathLike, index: int = 0) -> Ingredient:
    """Read an ingredient's metadata (config, settings, weight files, hash) without loading its weights."""
    folder = Path(path)
    label = f"ingredient {index} ({folder})"
    if not folder.exists():
        raise FileNotFoundError(f"{label}: checkpoint folder does not exist")
    if not folder.is_dir():
        raise SoupError(f"{label}: not a folder")
    if not (folder / "config.json").is_file():
        raise SoupError(f"{label}: no config.json; not a model folder")
    files = _weight_files(folder, label)
    return Ingredient(index=index, path=folder, weight_files=files, sha256=weights_sha256(files),
                      settings=read_saved_settings(str(folder)),
                      config=json.loads((folder / "config.json").read_text()))


def load_ingredients(paths: Sequence[str | os.PathLike]) -> list[Ingredient]:
    """:func:`load_ingredient` for each path, then :func:`check_compatible`. An empty list is an error."""
    if not paths:
        raise SoupError("empty ingredient list: a soup needs at least one checkpoint")
    ingredients = [load_ingredient(p, i) for i, p in enumerate(paths)]
    check_compatible(ingredients)
    return ingredients


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_ingredients(patterns: Sequence[str], base_dir: str | os.PathLike = ".", *,
                     last_per_stage: bool = False) -> list[Path]:
    """Expand glob patterns (relative to ``base_dir`` unless absolute) into checkpoint folders.

    A pattern ending in ``@last`` keeps only the last match (natural sort: ``checkpoint-100`` after
    ``checkpoint-20``) of each parent folder, e.g. ``train/pretrain/checkpoint-*@last`` is the stage-1 model;
    ``last_per_stage`` does that for every pattern. A pattern that matches nothing is an error naming it.
    Order: pattern order, natural order within a pattern; duplicates dropped.
    """
    base = Path(base_dir)
    found: list[Path] = []
    for pattern in patterns:
        last = last_per_stage or pattern.endswith("@last")
        glob_pattern = pattern.removesuffix("@last")
        full = glob_pattern if os.path.isabs(glob_pattern) else str(base / glob_pattern)
        matches = sorted((Path(p) for p in glob.glob(full) if Path(p).is_dir()), key=_natural_key)
        if not matches:
            raise FileNotFoundError(f"ingredient pattern {pattern!r} matches no checkpoint folder under {base}")
        if last:
            by_parent: dict[Path, Path] = {}
            for m in matches:
                by_parent[m.parent] = m  # sorted, so the last one wins
            matches = list(by_parent.values())
        found += [m for m in matches if m not in found]
    return found


def _tensor_headers(ingredient: Ingredient) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the safetensors headers (no tensor data is read)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in ingredient.weight_files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                out[key] = (tuple(s.get_shape()), str(s.get_dtype()))
    return out


def _tokenizer_hashes(folder: Path) -> dict[str, str]:
    return {name: provenance.sha256_file(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}


def check_compatible(ingredients: Sequence[Ingredient]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Check every ingredient against ingredient 0; return the shared ``name -> (shape, dtype)`` table.

    Compared: backbone config.json (architecture, sizes, ``is_causal``; volatile keys aside), embedding
    settings (pooling, bidirectional, max_length, prompts, ...), tokenizer files, and the parameter
    names, shapes and dtypes. The first difference raises :class:`SoupError` naming both ingredients.
    """
    if not ingredients:
        raise SoupError("empty ingredient list: a soup needs at least one checkpoint")
    ref = ingredients[0]
    ref_config = {k: v for k, v in ref.config.items() if k not in VOLATILE_CONFIG_KEYS}
    ref_tensors = _tensor_headers(ref)
    ref_tok = _tokenizer_hashes(ref.path)
    for ing in ingredients[1:]:
        where = f"{ing.label} does not match {ref.label}"
        config = {k: v for k, v in ing.config.items() if k not in VOLATILE_CONFIG_KEYS}
        # the most telling difference first: model type, then everything else in name order
        for key in sorted(set(config) | set(ref_config), key=lambda k: (k not in ("model_type", "architectures"), k)):
            if config.get(key, "<missing>") != ref_config.get(key, "<missing>"):
                raise SoupError(f"{where}: config.json {key} = {config.get(key, '<missing>')!r} vs "
                                f"{ref_config.get(key, '<missing>')!r} (different architecture)")
        for key in SETTINGS_KEYS:
            a, b = ing.settings.get(key), ref.settings.get(key)
            if key == "prompts":
                a, b = a or {}, b or {}
            if a != b:
                raise SoupError(f"{where}: embedding setting {key} = {a!r} vs {b!r}")
        tok = _tokenizer_hashes(ing.path)
        if tok != ref_tok:
            diff = sorted(k for k in set(tok) | set(ref_tok) if tok.get(k) != ref_tok.get(k))
            raise SoupError(f"{where}: tokenizer files differ ({diff})")
        tensors = _tensor_headers(ing)
        missing, extra = sorted(set(ref_tensors) - set(tensors)), sorted(set(tensors) - set(ref_tensors))
        if missing or extra:
            raise SoupError(f"{where}: parameter names differ; missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                            f", unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
        for key, (shape, dtype) in ref_tensors.items():
            if tensors[key] != (shape, dtype):
                raise SoupError(f"{where}: parameter {key} is {tensors[key][0]} {tensors[key][1]} vs "
                                f"{shape} {dtype}")
    return ref_tensors


# ---------------------------------------------------------------------------------------------- weights
def check_weights(weights: Sequence[float], ingredients: Sequence[Ingredient] | int, *,
                  tol: float = 1e-6) -> list[float]:
    """Validate a point of the simplex: one finite weight >= 0 per ingredient, summing to 1 (within ``tol``)."""
    n = ingredients if isinstance(ingredients, int) else len(ingredients)
    labels = ([f"ingredient {i}" for i in range(n)] if isinstance(ingredients, int)
              else [ing.label for ing in ingredients])
    if n == 0:
        raise SoupError("empty ingredient list: a soup needs at least one checkpoint")
    weights = list(weights)
    if len(weights) != n:
        raise SoupError(f"{len(weights)} weights for {n} ingredients: give exactly one weight per ingredient")
    out = []
    for label, w in zip(labels, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) or not math.isfinite(w):
            raise SoupError(f"weight of {label} is {w!r}: weights must be finite numbers")
        if w < 0:
            raise SoupError(f"weight of {label} is {w}: weights must be >= 0")
        out.append(float(w))
    total = math.fsum(out)
    if abs(total - 1.0) > tol:
        raise SoupError(f"weights sum to {total:.8g}, not 1 ({dict(zip(labels, out))}); normalise them "
                        f"(uniform_weights / round_to_simplex) or fix the config")
    return out


def uniform_weights(n: int) -> list[float]:
    """``[1/n] * n`` (the uniform soup)."""
    if n < 1:
        raise SoupError("empty ingredient list: a soup needs at least one checkpoint")
    return [1.0 / n] * n


def round_to_simplex(weights: Sequence[float], decimals: int = 3) -> list[float]:
    """Clip at 0, normalise, round to ``decimals`` and put the rounding remainder on the largest weight.

    Search points are rounded so that near-identical weight vectors share one cache entry.
    """
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    if not np.isfinite(w).all() or w.sum() <= 0:
        raise SoupError(f"cannot map {list(weights)} to the simplex (need finite values, not all 0)")
    w = np.round(w / w.sum(), decimals)
    if w.sum() == 0:  # every weight rounded away (many ingredients, few decimals)
        w[int(np.argmax(weights))] = 1.0
    w[int(np.argmax(w))] += 1.0 - w.sum()
    return [round(float(x), decimals) for x in w]


# ---------------------------------------------------------------------------------------------- averaging
@torch.inference_mode()
def average_checkpoints(ingredients: Sequence[Ingredient], weights: Sequence[float], *,
                        progress: bool = False) -> dict[str, torch.Tensor]:
    """Weighted average of the ingredients' parameters, streaming one safetensors file at a time.

    A float32 running weighted mean ``m <- m + (w_i / W_i) (x_i - m)`` (``W_i`` the weight seen so far)
    is kept in one buffer, via ``torch.lerp_`` (in place, no temporary). Why a running mean rather than a
    running sum: the soup of identical checkpoints is then the checkpoint bit-for-bit (``x - m`` is exactly
    0), and a one-hot weight vector returns that ingredient exactly. Ingredients with weight 0 are not read.
    Non-floating tensors (integer buffers) must be equal across the ingredients read. The result has each
    parameter's original dtype. Peak memory: the float32 buffer + one mapped file (~2 models for fp32).
    """
    weights = check_weights(weights, ingredients)
    mean: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    seen = 0.0
    active = [(ing, w) for ing, w in zip(ingredients, weights) if w > 0]
    for ing, w in progress_bar()(active, desc="soup", unit="ckpt", leave=False, disable=not progress):
        seen += w
        frac = w / seen
        for file in ing.weight_files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    x = f.get_tensor(key)
                    if key not in mean:
                        dtypes[key] = x.dtype
                        mean[key] = x.to(torch.float32) if x.is_floating_point() else x
                    elif not x.is_floating_point():
                        if not torch.equal(x, mean[key]):
                            raise SoupError(f"{ing.label}: integer tensor {key} differs from the first "
                                            "ingredient's; it cannot be averaged")
                    else:
                        mean[key].lerp_(x.to(torch.float32), frac)
                    del x
    for key, dtype in dtypes.items():
        if mean[key].dtype != dtype:
            mean[key] = mean[key].to(dtype)
    return mean


def display_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """``path`` relative to ``base`` when it lies under it (run directories move), else as given."""
    if base is not None:
        try:
            return str(Path(path).resolve().relative_to(Path(base).resolve()))
        except ValueError:
            pass
    return str(path)


def write_soup(ingredients: Sequence[Ingredient], weights: Sequence[float], out_dir: str | os.PathLike, *,
               extra: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None,
               progress: bool = False) -> Path:
    """Average the ingredients and write an EmbeddingModel folder at ``out_dir``, atomically.

    The folder is ingredient 0's (config, tokenizer, sentence-transformers module files; trainer state
    left out) with the averaged ``model.safetensors`` and a ``kalm_config.json`` that keeps the embedding
    settings and adds ``soup: {ingredients: [{path, sha256, weight}], ...extra}``. Built in a temporary
    sibling folder and published with :func:`kalm_lib.atomic.publish_dir`: a crash never leaves a
    half-written soup at ``out_dir``, and a previous soup there stays whole until the new one replaces it.
    """
    weights = check_weights(weights, ingredients)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_sibling(out)
    try:
        shutil.copytree(ingredients[0].path, tmp, ignore=shutil.ignore_patterns(*NOT_COPIED))
        sd = state_dict if state_dict is not None else average_checkpoints(ingredients, weights, progress=progress)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        del sd
        settings = {k: ingredients[0].settings[k] for k in SETTINGS_SAVED if k in ingredients[0].settings}
        soup_info = {"ingredients": [i.record(w) for i, w in zip(ingredients, weights)],
                     "weights_sha256": provenance.sha256_file(tmp / WEIGHTS_FILE), **(extra or {})}
        atomic.write_json(tmp / "kalm_config.json", {**settings, "soup": soup_info})
        atomic.publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left after a failure: publish_dir moved it
    return out
