"""3-class natural-language inference: entailment / neutral / contradiction.

Premise and hypothesis become one sequence, ``"Premise: {premise}\\nHypothesis: {hypothesis}"``; when it is too long
the premise is cut, never the hypothesis. Sources (``task.source``):

- ``sick`` (default): SICK (Marelli et al., 2014) with its own train 4,439 / validation (TRIAL) 495 / test 4,906.
- ``snli``: only SNLI 1.0 dev and test exist offline. Train is 90% of dev (8,857 pairs), validation the other 10%
  (985), both chosen with seed 123; test is SNLI test (9,824). Results are therefore not comparable with SNLI
  leaderboards, which train on the 550k train split.
- ``all_nli_med``: ``presencesw/all_nli_med`` on the Hugging Face hub (parquet). Read from
  ``$FINETUNE_DATA_DIR/nli/all_nli_med/*.parquet`` when present, else downloaded with ``huggingface_hub``. The code
  expects columns ``premise``, ``hypothesis``, ``label`` (or SNLI's ``sentence1``, ``sentence2``, ``gold_label``, whose
  no-consensus ``-`` rows are left out) with labels 0/1/2 = entailment/neutral/contradiction (the all-nli convention)
  or the label names; anything else stops with the columns and label values it found. Unavailable, it is an error.
- ``med_or_sick``: ``all_nli_med`` when it is present or can be downloaded, else SICK, with a loud warning on stderr.
  Which one was read is the trial's ``task_source_used`` note (and ``task_source_fallback`` says why SICK), so every
  result can be labelled with the data it really came from; a malformed medical set still stops, it never falls back.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tiktoken

from tasks.base import ClassificationTask, EncodedSplit, Example
from tasks.data import DataError, Source, _download, data_dir, open_text

if TYPE_CHECKING:
    import torch

    from model.gpt2 import GPT2
    from tasks.options import TaskOptions

LABELS = ("entailment", "neutral", "contradiction")
SPLIT_NAMES = {"train": "train", "validation": "validation", "test": "test"}
HUB_SOURCE = "all_nli_med"  # the one source read from the Hugging Face hub, not from a checked file
HUB_REPO = "presencesw/all_nli_med"
MED_OR_SICK = "med_or_sick"  # all_nli_med where it can be had, else SICK (loudly, and noted in every record)
FALLBACK_SOURCE = "sick"
# Column names the hub set may use: the all-nli names, or SNLI's (whose "-" gold label marks pairs without consensus).
PARQUET_COLUMNS = (("premise", "hypothesis", "label"), ("sentence1", "sentence2", "gold_label"))
NO_CONSENSUS = "-"


def _jsonl(records: list[dict], out: Path) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))


def _sick_from_tsv(raw: Path, out: Path) -> None:
    """SICK.txt (the release TSV) -> sick.jsonl.gz, the transformation recorded in shared/data/nli/SOURCE.md."""
    splits = {"TRAIN": "train", "TRIAL": "validation", "TEST": "test"}
    text = raw.read_bytes().decode("utf-8")
    rows = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    _jsonl([{"premise": r["sentence_A"], "hypothesis": r["sentence_B"], "label": r["entailment_label"].lower(),
             "split": splits[r["SemEval_set"]], "source": "sick", "idx": int(r["pair_ID"])} for r in rows], out)


_ESNLI = "https://raw.githubusercontent.com/OanaMariaCamburu/e-SNLI/7b585a3f077fdea899780eb0473940522ae44a2e/dataset/eSNLI/"


def _snli_from_esnli(raw: Path, out: Path) -> None:
    """e-SNLI's aligned s1/s2/labels files for dev and test -> snli_1.0_dev_test.jsonl.gz."""
    records = []
    for part, split in (("dev", "validation"), ("test", "test")):
        columns = []
        for stem in ("s1", "s2", "labels"):
            path = raw.parent / f"{stem}.{part}"
            _download(urllib.parse.urljoin(_ESNLI, f"{stem}.{part}"), path)
            columns.append(path.read_text(encoding="utf-8").split("\n"))
        for i, (premise, hypothesis, label) in enumerate(zip(*columns, strict=False)):
            if label.strip():
                records.append({"premise": premise.rstrip(), "hypothesis": hypothesis.rstrip(), "label": label.strip(),
                                "split": split, "source": "snli_1.0", "idx": i})
    _jsonl(records, out)


SOURCES = {
    "sick": Source("nli/sick.jsonl.gz",
                   "https://raw.githubusercontent.com/kkalouli/SICK-processing/0848f4aec60870122a4ca18de08ba0e25f6f9a75/SICK.txt",
                   "09121dd3e4487f5cac0187c262e9298bef42f8971ea2499c02cf4db471e7d538", _sick_from_tsv),
    "snli": Source("nli/snli_1.0_dev_test.jsonl.gz", _ESNLI + "README.md",
                   "b6cece645a19d5ed2a77d7e0bb200fb76ac504614cf14dc36f3ca9d66512be43", _snli_from_esnli),
}


def read_jsonl(path: Path) -> dict[str, list[Example]]:
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
                premise, hypothesis, label, split = (record[k] for k in ("premise", "hypothesis", "label", "split"))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            except (KeyError, TypeError) as err:
                raise DataError(f"{where}: missing field {err}; expected premise, hypothesis, label, split") from None
            if label not in LABELS:
                raise DataError(f"{where}: unknown label {label!r}; expected one of {LABELS}")
            if split not in splits:
                raise DataError(f"{where}: unknown split {split!r}; expected train, validation or test")
            splits[split].append(Example(text=_join(premise, hypothesis), label=LABELS.index(label)))
    return splits


def _join(premise: str, hypothesis: str) -> str:
    return f"Premise: {premise}\nHypothesis: {hypothesis}"


def read_parquet_splits(files: list[Path]) -> dict[str, list[Example]]:
    """``all_nli_med`` parquet files, checked for the columns and label coding this code expects."""
    import duckdb

    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for path in files:
        stem = path.name.lower()
        split = next((s for key, s in (("train", "train"), ("valid", "validation"), ("dev", "validation"),
                                       ("test", "test")) if key in stem), None)
        if split is None:
            raise DataError(f"{path}: cannot tell the split from the file name (expected train/validation/dev/test)")
        relation = duckdb.read_parquet(str(path))
        columns = relation.columns
        names = next((n for n in PARQUET_COLUMNS if set(n) <= set(columns)), None)
        if names is None:
            raise DataError(f"{path}: expected columns premise, hypothesis, label; found {columns} (SNLI's "
                            "sentence1, sentence2, gold_label are read too)")
        rows = relation.select(", ".join(f'"{c}"' for c in names)).fetchall()
        for row_no, (premise, hypothesis, label) in enumerate(rows, start=1):
            if label == NO_CONSENSUS and names[2] == "gold_label":
                continue  # SNLI-style pair the annotators did not agree on: no gold label
            if isinstance(label, str) and label.lower() in LABELS:
                index = LABELS.index(label.lower())
            elif isinstance(label, int) and 0 <= label < 3:
                index = label
            else:
                values = sorted({str(r[2]) for r in rows})[:10]
                raise DataError(f"{path}: row {row_no}: label {label!r} is not 0/1/2 or {LABELS}; "
                                f"label values in the file: {values}")
            if not premise or not hypothesis:
                raise DataError(f"{path}: row {row_no}: empty premise or hypothesis")
            splits[split].append(Example(text=_join(premise, hypothesis), label=index))
    return splits


def hub_files(root: Path | None) -> list[Path]:
    """The ``all_nli_med`` parquet files: ``<data dir>/nli/all_nli_med/`` when there, else the hub's snapshot,
    downloaded with ``huggingface_hub`` into its cache; a DataError when neither can be had."""
    local = (root if root is not None else data_dir()) / "nli" / HUB_SOURCE
    files = sorted(local.glob("**/*.parquet")) if local.is_dir() else []
    if files:
        return files
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(HUB_REPO, repo_type="dataset", allow_patterns=["*.parquet"]))
    except Exception as err:
        raise DataError(f"{HUB_SOURCE}: not in {local} and could not be downloaded from the hub ({HUB_REPO}): "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Put its parquet "
                        f"files in {local}, or use task.source=sick or snli") from None
    files = sorted(folder.glob("**/*.parquet"))
    if not files:
        raise DataError(f"{HUB_SOURCE}: the hub snapshot {folder} has no parquet files")
    return files


def warn_fallback(reason: str) -> None:
    """The banner ``med_or_sick`` prints when it reads SICK instead of the medical set (as the launcher does for a
    random-init model): results on SICK must never pass for medical NLI."""
    print("\n" + "!" * 100 + f"\n!! MEDICAL NLI UNAVAILABLE: {reason.splitlines()[0]}\n!! task.source=med_or_sick "
          "falls back to SICK (image and video captions, NOT medical). Every trial records\n!! task_source_used=sick "
          "in its notes: these results are about SICK, not about medical NLI.\n" + "!" * 100 + "\n",
          file=sys.stderr, flush=True)


class Nli(ClassificationTask):
    name = "nli"
    label_names = LABELS
    default_max_length = 128
    source_names = (*SOURCES, HUB_SOURCE, MED_OR_SICK)

    def __init__(self, config: TaskOptions) -> None:
        super().__init__(config)
        # The data actually read: task.source, or what med_or_sick resolved to once its files were looked for; and
        # why med_or_sick read SICK (None when it read the medical set, and for every other source).
        self.used_source: str | None = None if self.source == MED_OR_SICK else self.source
        self.fallback_reason: str | None = None

    @property
    def data_source(self) -> str:
        """``used_source`` once known; before that (``med_or_sick`` not yet resolved) the configured source."""
        return self.used_source or str(self.source)

    def sources(self) -> list[Source]:
        return [SOURCES[self.data_source]] if self.data_source in SOURCES else []

    def resolve_paths(self, root: Path | None) -> list[Path]:
        if self.source == MED_OR_SICK:
            try:
                files = hub_files(root)
            except DataError as err:
                self.used_source, self.fallback_reason = FALLBACK_SOURCE, str(err)
                warn_fallback(str(err))
            else:
                self.used_source, self.fallback_reason = HUB_SOURCE, None
                return files
        if self.data_source == HUB_SOURCE:
            return hub_files(root)
        return super().resolve_paths(root)

    def cache_options(self) -> dict[str, Any]:
        return {**super().cache_options(), "source": self.data_source}  # what was read, not what was asked for

    def prepare(self, model: GPT2, splits: dict[str, EncodedSplit], device: torch.device, autocast: Any,
                batch_size: int) -> dict[str, Any]:
        """The data source every NLI record carries (``med_or_sick`` may have fallen back, and says why)."""
        notes: dict[str, Any] = {"task_source_used": self.data_source}
        if self.fallback_reason is not None:
            notes["task_source_fallback"] = f"{HUB_SOURCE} unavailable, read SICK: {self.fallback_reason}"
        return notes

    def read_splits(self, paths: list[Path]) -> dict[str, list[Example]]:
        if self.data_source == HUB_SOURCE:
            return read_parquet_splits(paths)
        splits = read_jsonl(paths[0])
        if self.data_source == "snli":
            dev = splits["validation"]
            order = np.random.RandomState(123).permutation(len(dev))
            cut = int(len(dev) * 0.9)
            splits["train"] = [dev[i] for i in order[:cut]]
            splits["validation"] = [dev[i] for i in order[cut:]]
        return splits

    def encode(self, example: Example, enc: tiktoken.Encoding) -> tuple[list[int], int] | None:
        premise, _, hypothesis = example.text.partition("\nHypothesis: ")
        head = enc.encode_ordinary(premise)
        tail = enc.encode_ordinary("\nHypothesis: " + hypothesis)
        keep = max(self.max_length - len(tail), 0)  # cut the premise first, never the hypothesis
        return (head[:keep] + tail)[: self.max_length], example.label

