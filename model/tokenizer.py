"""GPT-2's byte-pair encoding through tiktoken, built offline from the data directory when it has the BPE files.

Offline (CI, air-gapped clusters) the encoding is built from ``$FINETUNE_DATA_DIR/gpt2-bpe/{encoder.json,vocab.bpe}``
after checking both files against the sha256 hashes tiktoken itself expects; otherwise tiktoken downloads them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

DATA_DIR_ENV = "FINETUNE_DATA_DIR"
EOT_TOKEN_ID = 50256
"""``<|endoftext|>``: GPT-2's only special token, used as end of text and as padding."""

# The hashes tiktoken's own gpt2() loader expects (tiktoken_ext/openai_public.py).
BPE_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

class TokenizerError(RuntimeError):
    """The GPT-2 encoding could be neither built from local files nor downloaded."""


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
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(bpe_dir / "vocab.bpe"),
        encoder_json_file=str(bpe_dir / "encoder.json"),
        vocab_bpe_hash=BPE_FILES["vocab.bpe"],
        encoder_json_hash=BPE_FILES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN_ID},
        explicit_n_vocab=50257,
    )


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
