"""The recipe's switches: one registry (:data:`SWITCHES`) and the one table of config keys they write.

A switch has allowed values, its value in the full recipe, and the dotted overrides each value writes.
``model.*`` and ``loss.*`` keys are keys of :class:`kalm_lib.train.StageConfig`; ``stages.*`` and ``soup.*``
keys are for the run_fn adapter (whether to pre-train first, whether to soup). A switch checks only the
form of its own values (true/false, one of its choices, a number, a list of dims): what a value means for
training (``focal_gamma >= 0``, ``temperature > 0``, positive dims) is checked once, by
:func:`kalm_lib.train.validate_config`, which the trainer runner applies to every cell before any work.

To add a switch: one :class:`Switch` in :func:`_registry` (and, for a new config key, one line of
:data:`OVERRIDE_KEYS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

from kalm_lib.config import ConfigError
from kalm_lib.data.records import TASK_TYPES

# The one table of config keys the switches write, as dotted paths. Align names here, only here.
OVERRIDE_KEYS = {
    "focal_gamma": "loss.focal_gamma",
    "mix_mode": "loss.mix_mode",
    "in_batch_by_task": "loss.in_batch_by_task",      # + ".<task_type>"
    "matryoshka_dims": "loss.matryoshka_dims",
    "temperature": "loss.temperature",
    "pretrain_enabled": "stages.pretrain.enabled",
    "soup_mode": "soup.mode",
    "bidirectional": "model.bidirectional",
    "pooling": "model.pooling",
    "stage": "stage",                                  # the trainer's stage name (distill needs a KL weight)
    "distill_weight_cl": "loss.distill_weight_cl",
    "distill_weight_kl": "loss.distill_weight_kl",
    "positives": "data.positives",                     # example | label_text (classification/clustering)
    "instruction_policy": "data.instruction_policy",   # both | none | off (training; the saved prompts follow)
    "source_weights": "data.source_weights",           # the per-source mixture (in-memory records)
}
# Top-level sections of OVERRIDE_KEYS that are not StageConfig keys: the run_fn adapter acts on them.
ADAPTER_SECTIONS = ("stages", "soup")


class GridError(ConfigError):
    """A grid that cannot run: unknown switch, bad value, conflicting switches, empty seeds."""


def _check_bool(name: str, value: Any, where: str) -> bool:
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false"):
        value = value.lower() in ("on", "true")
    if not isinstance(value, bool):
        raise GridError(f"{where}: switch {name} takes true/false (on/off), got {value!r}")
    return value


def _check_dims(name: str, value: Any, where: str) -> bool | tuple[int, ...]:
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return tuple(value)
    raise GridError(f"{where}: switch {name} takes true/false or a list of dims, got {value!r}")


def _check_weights(name: str, value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and k and isinstance(w, (int, float)) and not isinstance(w, bool)
            and math.isfinite(w) and w >= 0 for k, w in value.items()):
        raise GridError(f"{where}: switch {name} takes a mapping of source (or lang:<code>, task:<type>) to a "
                        f"weight >= 0, got {value!r}")
    return {k: float(value[k]) for k in sorted(value)}


@dataclass(frozen=True)
class Switch:
    """A recipe switch: allowed values, its value in the full recipe, and the overrides it writes.

    ``overrides(value, assignment)`` gets the switch's value and the whole cell's switch assignment
    (so ``focal`` can read ``focal_gamma``); ``keys`` lists the config keys it may write, for conflicts.
    """

    name: str
    help: str
    default: Any
    kind: Literal["bool", "choice", "float", "dims", "weights"]
    overrides: Callable[[Any, Mapping[str, Any]], dict[str, Any]]
    keys: tuple[str, ...] = ()
    choices: tuple[Any, ...] = ()

    def check(self, value: Any, where: str) -> Any:
        """Normalise a value and check its form for this switch (YAML's on/off are booleans)."""
        if self.kind == "bool":
            return _check_bool(self.name, value, where)
        if self.kind == "dims":
            return _check_dims(self.name, value, where)
        if self.kind == "weights":
            return _check_weights(self.name, value, where)
        if self.kind == "choice":
            if value is False and "off" in self.choices:  # YAML reads a bare `off` as false
                value = "off"
            if value not in self.choices:
                raise GridError(f"{where}: switch {self.name} takes one of {list(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GridError(f"{where}: switch {self.name} takes a number, got {value!r}")
        return float(value)


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer StageConfig overrides, adapter overrides): ``stages.*`` / ``soup.*`` keys are not
    StageConfig keys; a run_fn adapter acts on them (skip pre-training, soup vs best checkpoint)."""
    adapter = {k: v for k, v in overrides.items() if k.split(".", 1)[0] in ADAPTER_SECTIONS}
    return {k: v for k, v in overrides.items() if k not in adapter}, adapter


def _const(key: str, mapping: Mapping[Any, Any] | None = None):
    return lambda v, _a: {key: mapping[v] if mapping is not None else v}


def _focal(on: bool, assignment: Mapping[str, Any]) -> dict[str, Any]:
    gamma = assignment.get("focal_gamma", SWITCHES["focal_gamma"].default)
    return {OVERRIDE_KEYS["focal_gamma"]: gamma if on else 0.0}


def _matryoshka(value: Any, _a: Mapping[str, Any]) -> dict[str, Any]:
    # on: keep the stage config's dims (they depend on the model's width); off: no truncated losses
    if value is True:
        return {}
    return {OVERRIDE_KEYS["matryoshka_dims"]: None if value is False else list(value)}


def _architecture(value: str, _a: Mapping[str, Any]) -> dict[str, Any]:
    paper = value == "bidirectional_mean"
    return {OVERRIDE_KEYS["bidirectional"]: paper, OVERRIDE_KEYS["pooling"]: "mean" if paper else "last"}


def _distillation(value: str, _a: Mapping[str, Any]) -> dict[str, Any]:
    # both: the distill config's own a * L_CL + b * L_KL (paper V2.5: 0.3 / 0.7); KL only: b = 1, a = 0;
    # CL only: the same run without the teacher (a = 1, b = 0), i.e. contrastive fine-tuning continued on the
    # distillation data and settings, so the trainer runs it as a fine-tuning stage (a distill stage needs b > 0)
    k = OVERRIDE_KEYS
    if value == "kl_only":
        return {k["distill_weight_cl"]: 0.0, k["distill_weight_kl"]: 1.0}
    if value == "cl_only":
        return {k["distill_weight_cl"]: 1.0, k["distill_weight_kl"]: 0.0, k["stage"]: "finetune"}
    return {}


def _positives(value: str, _a: Mapping[str, Any]) -> dict[str, Any]:
    # example-based positives are the curated records as they are (the trainer's default, no key written, so
    # the full-recipe cell runs on any trainer); label_text asks the trainer for the class label's text
    return {} if value == "example" else {OVERRIDE_KEYS["positives"]: value}


def _registry() -> dict[str, Switch]:
    k = OVERRIDE_KEYS
    switches = [
        Switch("focal", "focal-style reweighting of the InfoNCE terms (w = (1-p)^gamma); off = gamma 0",
               True, "bool", _focal, (k["focal_gamma"],)),
        Switch("focal_gamma", "gamma of the focal weights when focal is on (paper: 0.5)",
               0.5, "float", lambda v, a: {} if "focal" in a else {k["focal_gamma"]: v}, (k["focal_gamma"],)),
        Switch("hard_negative_mixing", "online hard-negative mixing in embedding space",
               "pairwise", "choice", _const(k["mix_mode"], {"off": "none", "pairwise": "pairwise",
                                                             "listwise": "listwise"}),
               (k["mix_mode"],), ("off", "pairwise", "listwise")),
        Switch("stage1", "weakly-supervised pre-training stage before fine-tuning",
               True, "bool", _const(k["pretrain_enabled"]), (k["pretrain_enabled"],)),
        Switch("matryoshka", "Matryoshka losses at truncated dims (true: the config's dims; or a list)",
               True, "dims", _matryoshka, (k["matryoshka_dims"],)),
        Switch("soup", "final model: parameter-averaged soup or the best single checkpoint",
               "soup", "choice", _const(k["soup_mode"]), (k["soup_mode"],), ("soup", "best_single")),
        Switch("temperature", "InfoNCE temperature tau (paper: 0.01)",
               0.01, "float", _const(k["temperature"]), (k["temperature"],)),
        Switch("architecture", "decoder attention + pooling: the paper's bidirectional+mean vs causal+last-token",
               "bidirectional_mean", "choice", _architecture, (k["bidirectional"], k["pooling"]),
               ("bidirectional_mean", "causal_last")),
        Switch("bidirectional", "remove the causal mask (for factorial attention x pooling grids)",
               True, "bool", _const(k["bidirectional"]), (k["bidirectional"],)),
        Switch("pooling", "pooling over tokens (for factorial attention x pooling grids)",
               "mean", "choice", _const(k["pooling"]), (k["pooling"],), ("mean", "last", "cls")),
        Switch("distillation", "V2.5 distillation objective (a distill stage config): both losses, KL only, or "
               "CL only (no teacher)", "kl_and_cl", "choice", _distillation,
               (k["distill_weight_cl"], k["distill_weight_kl"], k["stage"]), ("kl_and_cl", "kl_only", "cl_only")),
        Switch("positives", "classification/clustering positives: another example of the class (KaLM's "
               "example-based labelling) or the class label's text", "example", "choice", _positives,
               (k["positives"],), ("example", "label_text")),
        Switch("instructions", "instruction policy, the same in training and evaluation (the saved prompts "
               "follow it): both sides of symmetric tasks (KaLM V2), neither side, or no instructions at all",
               "both", "choice", _const(k["instruction_policy"]), (k["instruction_policy"],),
               ("both", "none", "off")),
        Switch("source_weights", "the per-source mixture: how often each source's records are drawn ({} = as "
               "curated; keys: a source, lang:<code> or task:<type>)", {}, "weights",
               lambda v, _a: {k["source_weights"]: dict(v)}, (k["source_weights"],)),
    ]
    # in-batch negatives per task type: false negatives for classification/clustering, so off there (paper)
    for tt in TASK_TYPES:
        key = f"{k['in_batch_by_task']}.{tt}"
        switches.append(Switch(f"in_batch.{tt}", f"in-batch negatives for {tt} batches",
                               tt not in ("classification", "clustering"), "bool", _const(key), (key,)))
    return {s.name: s for s in switches}


SWITCHES: dict[str, Switch] = _registry()


def value_label(value: Any) -> str:
    """How a switch value is written in cell names and results.csv's ``sw.*`` columns (on/off, [64,128])."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, Mapping):  # source weights: "natural" = the data as curated
        return ",".join(f"{k}={w:g}" for k, w in sorted(value.items())) or "natural"
    return str(value)
