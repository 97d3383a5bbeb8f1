"""The trainer's data: records -> batches. Unified records (invalid rows counted by reason), the step plan
(global batch, number of steps), task-homogeneous epoch batches with their hard negatives, and the
teacher-score cache of distillation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kalm_lib import locking, provenance
from kalm_lib.atomic import open_atomic, write_json
from kalm_lib.config import ConfigError
from kalm_lib.data.records import SYMMETRIC_TASK_TYPES, DataFormatError, Tally, read_records, record_problem
from kalm_lib.data.samplers import TaskBatchSampler
from kalm_lib.data.streaming import iter_parquet_records, shard_files
from kalm_lib.model import KALM_CONFIG, QUERY_TEMPLATE, read_saved_settings, resolve_source
from kalm_lib.train.config import DataConfig, StageConfig

# a teacher cache entry may take hours to compute on a big dataset: a second run sharing it waits that long
TEACHER_LOCK_WAIT_S = 24 * 3600.0

# ============================================================================================ data
class DataError(ValueError):
    """Training data that cannot be used (missing, empty, too small for the batch)."""


def load_records(path: str | os.PathLike, *, max_records: int | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Unified records from JSONL (or a folder of JSONL / parquet shards) through the one record reader
    (:func:`kalm_lib.data.records.read_records`): invalid rows are skipped and counted by reason (rows in =
    kept + rejected); record ids must be unique over all the files.

    Returns ``(records, row_counts)``; ``row_counts`` is ``{"rows_in", "kept", "rejected_<reason>": n}`` with
    the reasons of :data:`kalm_lib.data.records.REJECTION_REASONS`. Only ``query`` and ``pos`` are required;
    absent optional fields are filled in (``id`` = ``"<file name>:<line>"``, ``neg`` = ``[]``, ...).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data.train_file: dataset not found: {path}")
    tally, records, seen = Tally(), [], set()
    try:
        for f in shard_files(path):  # a file, or a folder of shards (a curated stage written per source)
            rows = iter_parquet_records(f, tally, "train_file", seen) if f.name.endswith(".parquet") else \
                read_records(f, tally, source="train_file", seen_ids=seen)
            for row in rows:
                records.append(row)
                if max_records is not None and len(records) >= max_records:
                    break
            if max_records is not None and len(records) >= max_records:
                break
    except DataFormatError as e:  # empty file, broken gzip
        raise DataError(f"data.train_file: {e}") from None
    counts = {"rows_in": tally.rows_in["train_file"], "kept": tally.kept["train_file"],
              **{f"rejected_{r}": n for r, n in tally.rejected["train_file"].items()}}
    if not records:
        raise DataError(f"data.train_file: no usable records in {path} ({counts})")
    return records, counts


def _record_problem(row: Any) -> str | None:
    """Why a parsed row is not a usable record, or None: the one record check
    (:func:`kalm_lib.data.records.record_problem`)."""
    return record_problem(row)


def load_training_data(config: StageConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The stage's records and row counts (:func:`load_records`), with what the objective needs of them checked."""
    records, counts = load_records(config.data.train_file, max_records=config.data.max_records)
    if config.data.source_weights:
        records = weight_sources(records, config.data.source_weights, seed=config.train.seed,
                                 where=config.data.train_file)
    if config.data.positives == "label_text":
        records = label_text_positives(records, seed=config.train.seed)
    if config.loss.distill_weight_kl > 0:
        no_negs = sum(1 for r in records if not r["neg"])
        if no_negs:
            raise DataError(f"data.train_file: {no_negs} record(s) in {config.data.train_file} have no hard "
                            f"negatives; distillation needs the teacher's scores over mined candidates")
    return records, counts


def weight_sources(records: list[dict[str, Any]], weights: dict[str, float], *, seed: int,
                   where: str = "data.train_file") -> list[dict[str, Any]]:
    """``data.source_weights``: each record drawn ``w`` times, ``w`` the product of the weights of the keys it
    matches (its ``source``, ``lang:<lang>``, ``task:<task_type>``): ``floor(w)`` copies plus one more with
    probability ``w - floor(w)``, from a generator seeded by ``seed`` and the record id (the same records for a
    seed, whatever the file order). Copies get ids ``<id>#<k>`` (ids stay unique). A key that matches no
    record is a :class:`DataError` (a misspelt source would otherwise be silently ignored)."""
    def keys_of(r: dict[str, Any]) -> tuple[str, ...]:
        return (str(r.get("source") or ""), f"lang:{r.get('lang') or ''}", f"task:{r.get('task_type') or ''}")

    present = {k for r in records for k in keys_of(r)}
    unknown = sorted(set(weights) - present)
    if unknown:
        raise DataError(f"data.source_weights: {unknown} match no record in {where} (sources: "
                        f"{sorted(k for k in present if ':' not in k)})")
    out: list[dict[str, Any]] = []
    for r in records:
        w = math.prod(weights.get(k, 1.0) for k in keys_of(r))
        copies = int(w) + (random.Random(f"kalm-source-weights-{seed}-{r['id']}").random() < w - int(w))
        out += [r if k == 0 else {**r, "id": f"{r['id']}#{k}"} for k in range(copies)]
    if not out:
        raise DataError(f"data.source_weights: {weights} leave no record of {where}")
    return out


def label_text_positives(records: list[dict[str, Any]], *, seed: int) -> list[dict[str, Any]]:
    """``data.positives: label_text``: every record with a ``label`` (example-based classification/clustering,
    kalm_lib.data.readers) gets ``pos = [its label]`` and as many negatives as it had, drawn from the labels of
    the other classes of its source (deterministic in seed and record id; cycled when there are fewer classes
    than negatives). Records without a label are unchanged."""
    classes: dict[str, list[str]] = {}
    for r in records:
        if r.get("label"):
            classes.setdefault(r.get("source", ""), [])
            if r["label"] not in classes[r.get("source", "")]:
                classes[r.get("source", "")].append(r["label"])
    out = []
    for r in records:
        if not r.get("label"):
            out.append(r)
            continue
        others = sorted(c for c in classes[r.get("source", "")] if c != r["label"])
        rng = random.Random(f"kalm-label-negatives-{seed}-{r['id']}")
        negs: list[str] = []
        while others and len(negs) < len(r["neg"]):
            negs += rng.sample(others, min(len(others), len(r["neg"]) - len(negs)))
        out.append({**r, "pos": [r["label"]], "neg": negs})
    return out


def plan_steps(records: list[dict[str, Any]], config: StageConfig, world: int) -> tuple[int, int, int]:
    """``(global_batch, per_device_batch, max_steps)`` on ``world`` processes.

    ``train.batch_size`` is the global (contrastive) batch, the recipe's number on any hardware: each process
    takes ``batch_size / world`` queries of it (a ConfigError when that does not divide), and the loss sees all
    of them (``loss.gather_across_devices``). ``train.max_steps``, or ``train.epochs`` passes over the full
    global batches of epoch 0. A batch larger than the data is a :class:`DataError`.
    """
    T, where = config.train, config.data.train_file
    global_batch = T.batch_size
    per_device = split_global_batch(global_batch, world)
    if global_batch > len(records):
        raise DataError(f"train.batch_size: a global batch of {global_batch} ({global_batch // world} x {world} "
                        f"processes) is larger than the {len(records)} usable records in {where}")
    first = epoch_batches(records, global_batch, seed=T.seed, epoch=0, homogeneous_ratio=config.data.homogeneous_ratio)
    if not first:
        raise DataError(f"data.train_file: no full batch of {global_batch} can be formed from {where}")
    return global_batch, per_device, T.max_steps or max(1, int(math.ceil(T.epochs * len(first))))


def split_global_batch(global_batch: int, world: int) -> int:
    """Each process's share of the global batch (``train.batch_size``); a ConfigError when it does not divide."""
    if global_batch % world:
        raise ConfigError(f"train.batch_size: the global batch of {global_batch} does not split over {world} "
                          f"processes; use a multiple of {world} (e.g. {(global_batch // world + 1) * world}) or "
                          f"another process count")
    return global_batch // world


def data_hashes(train_file: str | os.PathLike) -> dict[str, Any]:
    """What identifies the training data in provenance: the file's hash (+ the card hashes of its curation)."""
    train_file = Path(train_file)
    out: dict[str, Any] = {"train_file": str(train_file)}
    if train_file.is_dir():
        out["train_files_sha256"] = {f.name: provenance.sha256_file(f) for f in shard_files(train_file)}
    else:
        out["train_file_sha256"] = provenance.sha256_file(train_file)
    curated = train_file.parent / "provenance.json"
    if curated.is_file():  # card hashes recorded by `kalm curate`
        try:
            out["curation"] = json.loads(curated.read_text()).get("data", {})
        except json.JSONDecodeError:
            pass
    return out


def _task_key(row: dict[str, Any]) -> str:
    # A "task" for homogeneous batching: the source dataset (and its task type).
    return f"{row.get('task_type', 'retrieval')}/{row.get('source') or row.get('category') or ''}"


def epoch_batches(records: list[dict[str, Any]], global_batch: int, *, seed: int, epoch: int,
                  homogeneous_ratio: float) -> list[list[int]]:
    """Global batches (lists of record indices) for one epoch, deterministic in (seed, epoch).

    The curation module's :class:`~kalm_lib.data.samplers.TaskBatchSampler` decides them: batches from
    one task (the record's source), ``1 - homogeneous_ratio`` of the slots swapped between batches of
    different tasks, leftovers pooled into mixed batches. It runs here with ``world_size=1`` on the global
    batch, and :func:`build_batch` gives rank ``r`` the ``r``-th contiguous slice, which is exactly the
    sampler's own rank slicing. A last batch smaller than the global batch is dropped, so the contrastive
    batch size is the configured one at every step.
    """
    sampler = TaskBatchSampler([_task_key(r) for r in records], global_batch, homogeneous_ratio=homogeneous_ratio,
                               seed=seed)
    sampler.set_epoch(epoch)
    return [list(map(int, b)) for b in sampler.global_batches() if len(b) == global_batch]


@dataclass
class Batch:
    """The texts of one process's share of a step, plus what the loss needs about the global batch."""

    ids: list[str]                 # record ids of the global batch (for error messages)
    texts: list[str]               # local: queries, then positives, then negatives (query-major)
    prompts: list[str | None]
    local_queries: int
    in_batch: list[bool]           # per query of the global batch
    teacher: torch.Tensor | None   # [global N, 1 + M] teacher scores over the candidates


def build_batch(records: list[dict[str, Any]], global_idx: list[int], config: StageConfig, *, epoch: int,
                rank: int, world: int, teacher_cache: "TeacherCache | None" = None) -> Batch:
    """Pick each record's positive and M negatives (deterministic in seed, epoch, record) and slice this rank."""
    m = config.loss.num_hard_negatives
    local_n = len(global_idx) // world
    mine = global_idx[rank * local_n:(rank + 1) * local_n]
    picks = {i: _pick_candidates(records, i, m, config.train.seed, epoch) for i in global_idx}
    teacher = None
    if teacher_cache is not None:
        teacher = torch.stack([teacher_cache.candidates(i, picks[i][0], picks[i][2]) for i in global_idx])
    texts, prompts = _local_texts([(records[i], picks[i][0], picks[i][1]) for i in mine], config)
    return Batch(ids=[str(records[i]["id"]) for i in global_idx], texts=texts, prompts=prompts,
                 local_queries=len(mine),
                 in_batch=[config.loss.in_batch_for(records[i].get("task_type", "retrieval")) for i in global_idx],
                 teacher=teacher)


def build_stream_batch(rows: list[dict[str, Any]], config: StageConfig, *, pass_no: int, ids: list[str],
                       task_types: list[str]) -> Batch:
    """This process's share of a streamed global batch (:class:`kalm_lib.data.mixture.Slice`): each record's
    positive and M negatives picked as in :func:`build_batch`, deterministic in (seed, the source's pass, record
    id); a record without mined negatives borrows positives of the other records of this process's slice.
    ``ids`` / ``task_types``: the whole global batch's (the in-batch switch is per query of the global batch)."""
    m, seed = config.loss.num_hard_negatives, config.train.seed
    picked = []
    for i, row in enumerate(rows):
        rng = random.Random(f"kalm-candidates-{seed}-{pass_no}-{row['id']}")
        if m and not row["neg"] and len(rows) < 2:
            raise DataError(f"record {row['id']!r} has no hard negatives and its process's slice no other record to "
                            f"borrow positives from: mine negatives, or use a per-process batch of 2 or more")
        pos_j, negs, _ = _candidates(row, rng, m, lambda: rows[_other(rng, i, len(rows))]["pos"][0])
        picked.append((row, pos_j, negs))
    texts, prompts = _local_texts(picked, config)
    return Batch(ids=list(ids), texts=texts, prompts=prompts, local_queries=len(rows),
                 in_batch=[config.loss.in_batch_for(t) for t in task_types], teacher=None)


def _local_texts(picked: list[tuple[dict[str, Any], int, list[str]]],
                 config: StageConfig) -> tuple[list[str], list[str | None]]:
    """This process's texts (queries, then positives, then negatives, query-major) and their prompts."""
    m = config.loss.num_hard_negatives
    queries, positives, negatives, q_prompts, p_prompts = [], [], [], [], []
    for row, pos_j, neg_texts in picked:
        prompt, passage_prompt = _prompts(row, config.data)
        queries.append(row["query"])
        q_prompts.append(prompt)
        positives.append(row["pos"][pos_j])
        p_prompts.append(passage_prompt)
        negatives += neg_texts
    prompts = q_prompts + p_prompts + [p for p in p_prompts for _ in range(m)][:len(negatives)]
    return queries + positives + negatives, prompts


def _prompts(row: dict[str, Any], data: DataConfig) -> tuple[str | None, str | None]:
    """(query prompt, passage prompt) of a record for the trained model under ``data.instruction_policy``: its
    instruction in the KaLM template on the query side, on the passage side too for
    :meth:`DataConfig.passage_prompt_tasks`; none for a symmetric task under "none", none at all under "off"."""
    if data.instruction_policy == "off" or (data.instruction_policy == "none"
                                            and row.get("task_type") in SYMMETRIC_TASK_TYPES):
        return None, None
    return KALM_FORMAT.prompts(row, data.passage_prompt_tasks())


@dataclass(frozen=True)
class QueryFormat:
    """How a model's queries (and passages) are prefixed: ``template`` (with ``{instruction}``) for a record
    with an instruction, ``plain`` for one without, ``document`` for passages; ``kind`` says where it came from.
    The KaLM format (``kind`` "kalm") is the one the trained model uses (:func:`_prompts`)."""

    kind: str
    template: str | None = QUERY_TEMPLATE
    plain: str | None = None
    document: str | None = None

    def prompts(self, row: dict[str, Any], passage_instruction_tasks: list[str]) -> tuple[str | None, str | None]:
        """(query prompt, passage prompt) of a record; symmetric tasks of ``data.passage_instruction_tasks``
        get the query's prompt on both sides."""
        instruction = row.get("instruction")
        query = self.template.format(instruction=instruction) if instruction and self.template else self.plain
        return query, query if row.get("task_type") in passage_instruction_tasks else self.document


KALM_FORMAT = QueryFormat("kalm")


def teacher_query_format(teacher: str, template: str | None = None) -> QueryFormat:
    """The query format of a distillation teacher, from what it saved (no weights loaded).

    ``template`` (``distill.teacher_query_template``, with ``{instruction}``) wins. Otherwise: a workbench model
    (``kalm_config.json``) is asked the KaLM way; a saved ``query`` prompt shaped ``Instruct: ...\nQuery: ``
    (gte-Qwen2 / Qwen3-Embedding style) gets the record's instruction in place of its own; any other saved
    ``query`` prompt (e5 ``query: ``, bge's sentence) prefixes every query as it is; none: bare text. Passages
    take the saved ``document``/``passage`` prompt, if any.
    """
    folder = resolve_source(teacher)[0]
    saved = read_saved_settings(folder).get("prompts") or {}
    query, document = saved.get("query") or None, saved.get("document") or saved.get("passage") or None
    if template is not None:
        return QueryFormat("explicit", template=template, plain=query, document=document)
    if (folder / KALM_CONFIG).is_file():
        return KALM_FORMAT
    if query and query.startswith("Instruct: ") and "\nQuery: " in query:
        tail = query[query.index("\nQuery: "):]
        return QueryFormat("instruct-template", template="Instruct: {instruction}" + tail, plain=query,
                           document=document)
    return QueryFormat("saved-prompt" if query else "none", template=None, plain=query, document=document)


def _pick_candidates(records, i, m, seed, epoch) -> tuple[int, list[str], list[int | None]]:
    """(positive index, M negative texts, their indices in the record's neg list or None when borrowed)."""
    rng = random.Random(f"kalm-candidates-{seed}-{epoch}-{i}")
    return _candidates(records[i], rng, m, lambda: records[_other(rng, i, len(records))]["pos"][0])


def _other(rng: random.Random, i: int, n: int) -> int:
    """A random index in ``range(n)`` other than ``i``."""
    other = rng.randrange(n - 1)
    return other + (other >= i)


def _candidates(row: dict[str, Any], rng: random.Random, m: int,
                borrow: Callable[[], str]) -> tuple[int, list[str], list[int | None]]:
    """A record's positive and M negatives: its own negatives (cycled, reshuffled each round, when it has fewer
    than M), or positives of other records (``borrow``) when it has none (as FlagEmbedding does)."""
    pos_j = rng.randrange(len(row["pos"]))
    if m == 0:
        return pos_j, [], []
    own = list(range(len(row["neg"])))
    if len(own) >= m:
        chosen: list[int | None] = rng.sample(own, m)
    elif own:  # fewer than M: cycle through its own negatives, reshuffled each round
        chosen = []
        while len(chosen) < m:
            rng.shuffle(own)
            chosen += own[:m - len(chosen)]
    else:  # none mined: borrow positives of random other records
        chosen = [None] * m
    return pos_j, [row["neg"][c] if c is not None else borrow() for c in chosen], chosen


class MemoryFeed:
    """The in-memory batches of a run, from its start position: ``next()`` gives this process's next
    :class:`Batch` (epoch after epoch, each a new shuffle of the same records)."""

    def __init__(self, records: list[dict[str, Any]], config: StageConfig, *, global_batch: int, epoch: int,
                 batch_in_epoch: int, rank: int, world: int, teacher: "TeacherCache | None" = None):
        self.records, self.config, self.global_batch = records, config, global_batch
        self.rank, self.world, self.teacher = rank, world, teacher
        self.epoch, self.index = epoch, batch_in_epoch
        self.batches = self._epoch(epoch)

    def _epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.records, self.global_batch, seed=self.config.train.seed, epoch=epoch,
                             homogeneous_ratio=self.config.data.homogeneous_ratio)

    def next(self) -> Batch:
        if self.index >= len(self.batches):  # next epoch: a new shuffle of the same records
            self.epoch, self.index = self.epoch + 1, 0
            self.batches = self._epoch(self.epoch)
        batch = build_batch(self.records, self.batches[self.index], self.config, epoch=self.epoch, rank=self.rank,
                            world=self.world, teacher_cache=self.teacher)
        self.index += 1
        return batch

    @property
    def where(self) -> str:
        """The last batch, for messages."""
        return f"epoch {self.epoch}, batch {self.index - 1}"

    def position(self) -> dict[str, Any]:
        """What a checkpoint records to continue with the next batch."""
        return {"epoch": self.epoch, "batch_in_epoch": self.index}

    def finish(self, output_dir: Path) -> None:
        """Nothing to add at the end of an in-memory run (its rows are counted in provenance.json)."""


# ============================================================================================ teacher
class TeacherCache:
    """A teacher's cosine scores over every record's candidates (all positives, then all negatives).

    Computed once per (teacher, data, prompts, max length) and stored as ``teacher_scores-<key>.npz``;
    a later run with the same key reads it back instead of re-encoding.
    """

    def __init__(self, scores: np.ndarray, offsets: np.ndarray, n_pos: np.ndarray, path: Path | None = None):
        self.scores, self.offsets, self.n_pos, self.path = scores, offsets, n_pos, path

    def candidates(self, i: int, pos_j: int, neg_idx: list[int | None]) -> torch.Tensor:
        row = self.scores[self.offsets[i]:self.offsets[i + 1]]
        cols = [pos_j] + [int(self.n_pos[i]) + j for j in neg_idx]  # type: ignore[operator]
        return torch.from_numpy(row[cols].astype(np.float32))


def teacher_scores(teacher: Any, records: list[dict[str, Any]], *, cache_dir: str | os.PathLike, key_parts: dict[str, Any],
                   passage_instruction_tasks: list[str] = (), batch_size: int = 64, show_progress: bool = True,
                   query_format: QueryFormat = KALM_FORMAT) -> TeacherCache:
    """Score every record's candidates with ``teacher`` (an EmbeddingModel, or a callable returning one),
    its queries and passages prefixed in the teacher's own ``query_format`` (:func:`teacher_query_format`).

    ``key_parts`` identifies teacher and data (e.g. teacher weights hash, data file hash); the cache file
    name is their hash, so a different teacher or dataset never reads stale scores. The file is written
    atomically (:mod:`kalm_lib.atomic`): a killed run leaves no half-written cache under the final name. It is
    computed under the entry's lock (:mod:`kalm_lib.locking`, ``<entry>.lock``): a second run sharing the cache
    folder waits for the first, then reads its scores instead of computing them again.
    """
    key_parts = {**key_parts, "query_format": dataclasses.asdict(query_format)}   # another format: other scores
    key = provenance.config_hash({**key_parts, "passage_instruction_tasks": sorted(passage_instruction_tasks),
                                  "n_records": len(records)})
    path = Path(cache_dir) / f"teacher_scores-{key}.npz"
    if path.is_file():
        return _read_teacher_cache(path)
    # one process computes a cache entry; another run wanting the same one waits for it, then reads it
    with locking.hold(path.with_name(path.name + ".lock"), what=f"teacher score cache {path}",
                      wait_s=TEACHER_LOCK_WAIT_S):
        if path.is_file():
            return _read_teacher_cache(path)
        return _compute_teacher_scores(teacher, records, path, key, key_parts, passage_instruction_tasks,
                                       batch_size, show_progress, query_format)


def _read_teacher_cache(path: Path) -> TeacherCache:
    z = np.load(path)
    return TeacherCache(z["scores"], z["offsets"], z["n_pos"], path)


def _compute_teacher_scores(teacher: Any, records: list[dict[str, Any]], path: Path, key: str,
                            key_parts: dict[str, Any], passage_instruction_tasks: list[str], batch_size: int,
                            show_progress: bool, query_format: QueryFormat) -> TeacherCache:
    """Encode and score (see :func:`teacher_scores`), then write the cache entry atomically."""
    model = teacher() if callable(teacher) and not isinstance(teacher, torch.nn.Module) else teacher
    prompts = [query_format.prompts(row, passage_instruction_tasks) for row in records]
    q_keys = [(p[0], row["query"]) for p, row in zip(prompts, records)]
    c_keys = [[(p[1], t) for t in row["pos"] + row["neg"]] for p, row in zip(prompts, records)]
    embedded = _embed_by_prompt(model, q_keys + [k for ks in c_keys for k in ks], batch_size, show_progress)
    scores, offsets = [], [0]
    for qk, cks in zip(q_keys, c_keys):
        q = embedded[qk]
        scores += [float(np.dot(q, embedded[ck])) for ck in cks]
        offsets.append(len(scores))
    arrays = {"scores": np.asarray(scores, np.float32), "offsets": np.asarray(offsets, np.int64),
              "n_pos": np.asarray([len(r["pos"]) for r in records], np.int64)}
    with open_atomic(path, "wb") as f:
        np.savez(f, **arrays)
    write_json(path.with_suffix(".json"), {"key": key, **key_parts})
    return TeacherCache(arrays["scores"], arrays["offsets"], arrays["n_pos"], path)


def _embed_by_prompt(model: Any, keys: list[tuple[str | None, str]], batch_size: int,
                     show_progress: bool) -> dict[tuple[str | None, str], np.ndarray]:
    """Embeddings of ``(prompt, text)`` pairs: each distinct text once, one encode call per prompt."""
    by_prompt: dict[str | None, list[str]] = {}
    for prompt, text in keys:
        by_prompt.setdefault(prompt, []).append(text)
    embedded: dict[tuple[str | None, str], np.ndarray] = {}
    for prompt, texts in by_prompt.items():
        unique = list(dict.fromkeys(texts))
        vecs = model.encode(unique, prompt=prompt, batch_size=batch_size, show_progress=show_progress)
        embedded.update({(prompt, t): v for t, v in zip(unique, vecs)})
    return embedded


def model_identity(name_or_path: str) -> dict[str, Any]:
    """What identifies a model for caches and resume checks: its name and, for a folder, a weights hash."""
    folder = Path(name_or_path)
    out: dict[str, Any] = {"name_or_path": name_or_path}
    if folder.is_dir():
        weights = sorted(folder.glob("*.safetensors"))
        out["weights_sha256"] = [provenance.sha256_file(w) for w in weights]
    return out
