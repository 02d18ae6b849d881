"""GPT-2's byte-pair encoding through tiktoken, built offline from the data directory when it has the BPE files.

Offline (CI, air-gapped clusters) the encoding is built from ``$FINETUNE_DATA_DIR/gpt2-bpe/{encoder.json,vocab.bpe}``
after checking both files against the sha256 hashes tiktoken itself expects; otherwise tiktoken downloads them.

Parsing those two files takes 0.3-0.5 s of CPU, paid by every process that tokenizes (each Ray trial worker, each
driver). Their ranks are therefore kept in the cache folder as ``r50k_base.tiktoken``: GPT-2's ranks written in
tiktoken's own format are byte for byte tiktoken's published r50k_base file, so the cached file is checked against
that file's sha256 on every read (0.03 s) and rebuilt from the BPE files when it is missing or does not match.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

DATA_DIR_ENV = "FINETUNE_DATA_DIR"
CACHE_ENV = "FINETUNE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "gpt2-finetune-guide" / "tokens"
RANKS_FILE = "r50k_base.tiktoken"
# The sha256 tiktoken expects of its r50k_base.tiktoken (tiktoken_ext/openai_public.py): GPT-2's ranks, one
# "<base64 token> <rank>" line each, in rank order.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN_ID = 50256
"""``<|endoftext|>``: GPT-2's only special token, used as end of text and as padding."""

# The hashes tiktoken's own gpt2() loader expects (tiktoken_ext/openai_public.py).
BPE_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

class TokenizerError(RuntimeError):
    """The GPT-2 encoding could be neither built from local files nor downloaded."""


def cache_dir() -> Path:
    """The cache folder of encoded data and the encoding's ranks: ``$FINETUNE_CACHE_DIR``, else
    ``~/.cache/gpt2-finetune-guide/tokens``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else DEFAULT_CACHE_DIR


def default_data_dir() -> Path | None:
    """The data directory named by ``$FINETUNE_DATA_DIR``, or None when it is unset."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def sha256_file(path: Path, decompress: bool = False) -> str:
    """sha256 of a file's bytes (of the uncompressed bytes with ``decompress``, for .gz files whose content, not
    their packing, is what a checksum vouches for)."""
    with (gzip.open if decompress else open)(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _from_local_files(bpe_dir: Path) -> tiktoken.Encoding:
    for name, expected in BPE_FILES.items():
        actual = sha256_file(bpe_dir / name)
        if actual != expected:
            raise TokenizerError(
                f"{bpe_dir / name}: sha256 {actual} does not match GPT-2's {expected}; the file is corrupt or not "
                "GPT-2's. Replace it, or remove the gpt2-bpe folder to let tiktoken download the encoding."
            )
    ranks = _cached_ranks(cache_dir() / RANKS_FILE)
    if ranks is None:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(bpe_dir / "vocab.bpe"),
            encoder_json_file=str(bpe_dir / "encoder.json"),
            vocab_bpe_hash=BPE_FILES["vocab.bpe"],
            encoder_json_hash=BPE_FILES["encoder.json"],
        )
        _write_ranks(cache_dir() / RANKS_FILE, ranks)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN_ID},
        explicit_n_vocab=50257,
    )


def _cached_ranks(path: Path) -> dict[bytes, int] | None:
    """GPT-2's ranks from the cache, None when the file is missing, unreadable or not byte for byte r50k_base's."""
    try:
        return load_tiktoken_bpe(str(path), expected_hash=RANKS_SHA256)
    except (OSError, ValueError):  # tiktoken raises ValueError on a hash mismatch or a malformed line
        return None


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    """Keep ``ranks`` for the next process (atomically: a reader sees the whole file or none); an unwritable cache
    only costs parsing the BPE files again."""
    text = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(),
                                                                                           key=lambda item: item[1]))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


@functools.cache
def _cached(data_dir: Path | None) -> tiktoken.Encoding:
    if data_dir is not None:
        bpe_dir = data_dir / "gpt2-bpe"
        if all((bpe_dir / name).is_file() for name in BPE_FILES):
            return _from_local_files(bpe_dir)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # tiktoken surfaces network failures as assorted requests/OS errors
        where = f"{data_dir / 'gpt2-bpe'}" if data_dir is not None else f"${DATA_DIR_ENV}/gpt2-bpe (unset)"
        raise TokenizerError(
            f"GPT-2 tokenizer unavailable: encoder.json and vocab.bpe are not in {where}, and tiktoken could not "
            f"download them ({type(err).__name__}: {str(err)[:200]}). Set {DATA_DIR_ENV} to a directory holding "
            "gpt2-bpe/encoder.json and gpt2-bpe/vocab.bpe, or run once with network access."
        ) from None


def get_tokenizer(data_dir: str | Path | None = None) -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding; ``data_dir`` defaults to ``$FINETUNE_DATA_DIR``. Built once per directory."""
    resolved = Path(data_dir) if data_dir is not None else default_data_dir()
    return _cached(resolved.resolve() if resolved is not None else None)
