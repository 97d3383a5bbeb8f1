"""kalm_lib: a thin library for training compact text embedding models with the KaLM-Embedding-V2 recipe.

Modules (one concern each): ``model`` (EmbeddingModel), ``losses`` (InfoNCE, focal, mixing, MRL,
distillation, cross-device gather), ``data`` (cards, readers, curation, mining, samplers), ``train``,
``soup``, ``evaluate``, ``report``, ``widgets``, ``pipeline``; ``config`` and ``provenance`` are shared.
"""

__version__ = "0.1.0"
