"""How mteb's words map onto the workbench's: task types and language tags.

Result tables use one vocabulary with the training records (:data:`kalm_lib.data.records.TASK_TYPES`):
mteb's ``"STS"`` is our ``"sts"``, ``"PairClassification"`` our ``"pair_classification"``, and so on
(:data:`kalm_lib.evaluation.tasks.MTEB_TYPE_TO_OURS`). An mteb type with no counterpart in training records
(``BitextMining``, ``Summarization``, ...) keeps mteb's name in snake case (``bitext_mining``): it is a task
type of its own in MTY, as on the leaderboard. Languages are our tags ``en`` / ``zh``; other ISO 639-3
codes stay as they are.
"""

from __future__ import annotations

import re

from kalm_lib.evaluation.tasks import MTEB_TYPE_TO_OURS

__all__ = ["LANG_OF_ISO", "task_type_of", "mteb_type_of", "lang_of"]

LANG_OF_ISO = {"eng": "en", "cmn": "zh", "zho": "zh"}  # mteb ISO 639-3 codes -> our language tags


def task_type_of(mteb_type: str) -> str:
    """Our task type for an mteb task type (``"PairClassification"`` -> ``"pair_classification"``)."""
    mteb_type = str(mteb_type)
    if mteb_type in MTEB_TYPE_TO_OURS:
        return MTEB_TYPE_TO_OURS[mteb_type]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", mteb_type).lower()


def mteb_type_of(task_type: str) -> str:
    """mteb's task type for one of ours (``"pair_classification"`` -> ``"PairClassification"``); an mteb type
    given as is stays as it is (the inverse of :func:`task_type_of`)."""
    ours_to_mteb = {ours: mteb for mteb, ours in MTEB_TYPE_TO_OURS.items()}
    if task_type in ours_to_mteb:
        return ours_to_mteb[task_type]
    if "_" in task_type or task_type.islower():
        return "".join(part[:1].upper() + part[1:] for part in task_type.split("_"))
    return task_type


def lang_of(mteb_languages: list[str]) -> str:
    """Our language tag for an mteb task's languages (``["eng-Latn"]`` -> ``"en"``; several -> ``"multi"``)."""
    langs = sorted({LANG_OF_ISO.get(code.split("-")[0], code.split("-")[0]) for code in mteb_languages})
    return langs[0] if len(langs) == 1 else "multi"
