"""The tokenizer is GPT-2's, built offline from the data directory, and refuses files that are not GPT-2's."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from model import TokenizerError, get_tokenizer
from model import tokenizer as tok


def test_hello_world_offline_from_data_dir(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(name: str):
        raise AssertionError("tiktoken download attempted although the data directory has the BPE files")

    monkeypatch.setattr(tok.tiktoken, "get_encoding", no_download)
    tok._cached.cache_clear()
    enc = get_tokenizer(data_dir)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tok.EOT_TOKEN_ID]


def test_data_dir_comes_from_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(data_dir))
    assert get_tokenizer() is get_tokenizer(data_dir)


def test_decode_encode_round_trip_on_real_text(data_dir: Path) -> None:
    enc = get_tokenizer(data_dir)
    sms = (data_dir / "sms_spam" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()[:500]
    with gzip.open(data_dir / "alpaca" / "alpaca_data.json.gz", "rt", encoding="utf-8") as f:
        alpaca = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in json.load(f)[:300]]
    texts = [*sms, *alpaca, "\n".join(sms)]
    for text in texts:
        assert enc.decode(enc.encode(text)) == text
    assert sum(len(enc.encode(t)) for t in texts) > 10_000


def test_corrupt_bpe_file_is_named(data_dir: Path, tmp_path: Path) -> None:
    bpe = tmp_path / "gpt2-bpe"
    bpe.mkdir()
    shutil.copy(data_dir / "gpt2-bpe" / "encoder.json", bpe / "encoder.json")
    (bpe / "vocab.bpe").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match=r"vocab\.bpe: sha256 .* does not match"):
        get_tokenizer(tmp_path)


def test_no_files_and_no_network_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tok.tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match=r"encoder\.json and vocab\.bpe are not in .*gpt2-bpe.*FINETUNE_DATA_DIR"):
        get_tokenizer(tmp_path)


@pytest.mark.parametrize("damage", ["missing", "truncated", "other_ranks"])
def test_the_ranks_cache_is_tiktokens_r50k_file_and_a_bad_one_is_rebuilt(damage: str, data_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The first build from the BPE files keeps GPT-2's ranks as tiktoken's r50k_base file (its published sha256);
    a later build reads them from there, and a cached file that is not exactly that is ignored and written again."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    cached = tmp_path / tok.RANKS_FILE
    tok._cached.cache_clear()
    reference = get_tokenizer(data_dir).encode("Hello world, and <|endoftext|>", allowed_special="all")
    assert tok.sha256_file(cached) == tok.RANKS_SHA256
    if damage == "truncated":
        cached.write_bytes(cached.read_bytes()[:1000])
    elif damage == "other_ranks":  # well-formed, one rank swapped: only the checksum tells
        lines = cached.read_text().splitlines(keepends=True)
        lines[0], lines[1] = lines[0].replace(" 0\n", " 1\n"), lines[1].replace(" 1\n", " 0\n")
        cached.write_text("".join(lines))
    else:
        cached.unlink()
    built: list[int] = []
    monkeypatch.setattr(tok, "data_gym_to_mergeable_bpe_ranks",
                        lambda **files: built.append(1) or data_gym_to_mergeable_bpe_ranks(**files))
    tok._cached.cache_clear()
    assert get_tokenizer(data_dir).encode("Hello world, and <|endoftext|>", allowed_special="all") == reference
    assert built == [1] and tok.sha256_file(cached) == tok.RANKS_SHA256  # rebuilt from the BPE files, kept again
    tok._cached.cache_clear()
    get_tokenizer(data_dir)
    assert built == [1]  # the next process reads the cache
    tok._cached.cache_clear()
