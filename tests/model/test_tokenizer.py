"""The tokenizer is GPT-2's, built offline from the data directory, and refuses files that are not GPT-2's."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

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
