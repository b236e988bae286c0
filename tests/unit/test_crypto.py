"""Tokens at rest: encrypted with rotating keys, found by keyed hash, never echoed in errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worker import crypto, errors
from worker.settings import Settings

TOKEN = "pts_" + "a" * 32
OLD_KEY = crypto.generate_key()
NEW_KEY = crypto.generate_key()
PG_URL = "postgresql://postgres@127.0.0.1:5432/app"


def test_round_trip_and_ciphertext_hides_the_token() -> None:
    cipher = crypto.TokenCipher([NEW_KEY])

    ciphertext = cipher.encrypt(TOKEN)

    assert cipher.decrypt(ciphertext) == TOKEN
    assert TOKEN not in ciphertext
    assert TOKEN[4:20] not in ciphertext
    assert cipher.encrypt(TOKEN) != ciphertext  # a fresh IV every time


def test_unicode_tokens_round_trip() -> None:
    cipher = crypto.TokenCipher([NEW_KEY])
    assert cipher.decrypt(cipher.encrypt("jeton-été")) == "jeton-été"


@pytest.mark.parametrize("ciphertext", ["not a fernet token", "gAAAAA" + "x" * 80, "é", ""])
def test_undecryptable_text_raises_crypto_error_without_echoing_it(ciphertext: str) -> None:
    cipher = crypto.TokenCipher([NEW_KEY])

    with pytest.raises(errors.CryptoError) as raised:
        cipher.decrypt(ciphertext)

    assert ciphertext not in str(raised.value) or not ciphertext
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_ciphertext_under_an_unknown_key_raises_crypto_error() -> None:
    ciphertext = crypto.TokenCipher([OLD_KEY]).encrypt(TOKEN)

    with pytest.raises(errors.CryptoError) as raised:
        crypto.TokenCipher([NEW_KEY]).decrypt(ciphertext)

    assert ciphertext not in str(raised.value)
    assert TOKEN not in str(raised.value)
    assert "SESSION_SYNC_ENCRYPTION_KEYS" in str(raised.value)


def test_key_rotation() -> None:
    # Given a token encrypted and hashed under the old key
    old = crypto.TokenCipher([OLD_KEY])
    old_ciphertext = old.encrypt(TOKEN)
    old_hash = old.lookup_hash(TOKEN)

    # When a new key is put first
    rotating = crypto.TokenCipher([NEW_KEY, OLD_KEY])

    # Then the old ciphertext still decrypts, and old rows are still found by hash
    assert rotating.decrypt(old_ciphertext) == TOKEN
    assert old_hash in rotating.lookup_hashes(TOKEN)
    assert rotating.lookup_hashes(TOKEN) == [rotating.lookup_hash(TOKEN), old_hash]
    assert rotating.lookup_hash(TOKEN) != old_hash

    # When the row is rotated, the old key is no longer needed
    rotated = rotating.rotate(old_ciphertext)
    assert crypto.TokenCipher([NEW_KEY]).decrypt(rotated) == TOKEN
    assert crypto.TokenCipher([NEW_KEY]).lookup_hash(TOKEN) == rotating.lookup_hash(TOKEN)
    with pytest.raises(errors.CryptoError):
        old.decrypt(rotated)
    with pytest.raises(errors.CryptoError):
        old.rotate("garbage")


def test_lookup_hash_is_the_documented_hmac() -> None:
    # Apps in other languages compute the same hash: HMAC-SHA256 keyed by HKDF of the first key.
    lookup_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"session-sync token lookup v1").derive(
        base64.urlsafe_b64decode(NEW_KEY)
    )
    expected = hmac.new(lookup_key, TOKEN.encode(), hashlib.sha256).hexdigest()

    cipher = crypto.TokenCipher([NEW_KEY, OLD_KEY])

    assert cipher.lookup_hash(TOKEN) == expected
    assert len(expected) == 64 and expected == expected.lower()
    assert cipher.lookup_hash(TOKEN + "x") != expected


def test_repr_shows_no_key() -> None:
    text = repr(crypto.TokenCipher([NEW_KEY, OLD_KEY]))
    assert NEW_KEY not in text and OLD_KEY not in text
    assert "2 keys" in text


def test_keys_from_settings() -> None:
    settings = Settings.from_env({"SESSION_SYNC_ENCRYPTION_KEYS": f" {NEW_KEY} , {OLD_KEY}", "DATABASE_URL": PG_URL})
    cipher = crypto.TokenCipher.from_settings(settings)
    assert cipher.decrypt(crypto.TokenCipher([OLD_KEY]).encrypt(TOKEN)) == TOKEN
    assert cipher.lookup_hash(TOKEN) == crypto.TokenCipher([NEW_KEY]).lookup_hash(TOKEN)


BAD_KEY = "c2VjcmV0LXNlY3JldC1zZWNyZXQ="  # base64, but of 21 bytes


@pytest.mark.parametrize(
    ("value", "position"),
    [
        (BAD_KEY, "key 1 of 1"),
        (f"{NEW_KEY},{BAD_KEY}", "key 2 of 2"),
        (f"{NEW_KEY},,{OLD_KEY}", "key 2 of 3"),
        (f"{NEW_KEY},", "key 2 of 2"),
        (NEW_KEY[:-2], "key 1 of 1"),
        (" ", "empty"),
    ],
    # named, not shown: the keys are random, and every xdist worker must collect the same test ids
    ids=["bad", "new,bad", "new,,old", "new,", "new-cut-short", "blank"],
)
def test_bad_keys_name_the_variable_and_position_but_not_the_key(value: str, position: str) -> None:
    # Settings refuse them as soon as they are read, before any cipher is built
    with pytest.raises(errors.ConfigError) as raised:
        Settings.from_env({"SESSION_SYNC_ENCRYPTION_KEYS": value, "DATABASE_URL": PG_URL})
    with pytest.raises(errors.ConfigError):
        crypto.TokenCipher([part.strip() for part in value.split(",")])

    message = str(raised.value)
    assert raised.value.variable == "SESSION_SYNC_ENCRYPTION_KEYS"
    assert message.startswith("SESSION_SYNC_ENCRYPTION_KEYS: ")
    assert position in message
    for key in (BAD_KEY, NEW_KEY, NEW_KEY[:-2]):
        assert key not in message
    assert raised.value.__cause__ is None


def test_no_keys_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError):
        crypto.TokenCipher([])


def test_postgresql_without_keys_refuses_to_start() -> None:
    settings = Settings.from_env({"DATABASE_URL": PG_URL})

    with pytest.raises(errors.ConfigError) as raised:
        crypto.TokenCipher.from_settings(settings)

    assert str(raised.value) == "SESSION_SYNC_ENCRYPTION_KEYS: not set (required with PostgreSQL)"


def test_sqlite_without_keys_generates_a_dev_key_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Given a SQLite database and no keys
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}"})

    # When the cipher is built, a key is generated next to the database with private permissions
    with caplog.at_level(logging.WARNING, logger="worker.crypto"):
        first = crypto.TokenCipher.from_settings(settings)
    key_file = tmp_path / ".session-sync-dev.key"
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [key_file]  # no temporary file left behind

    # ... loudly, without showing it
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "DEVELOPMENT MODE" in record.getMessage()
    assert key not in caplog.text

    # Then a later run reuses it
    second = crypto.TokenCipher.from_settings(settings)
    assert second.decrypt(first.encrypt(TOKEN)) == TOKEN
    assert second.lookup_hash(TOKEN) == crypto.TokenCipher([key]).lookup_hash(TOKEN)
    assert key_file.read_text().strip() == key


def test_sqlite_in_memory_without_keys_uses_a_throwaway_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cipher = crypto.TokenCipher.from_settings(Settings.from_env({"DATABASE_URL": "sqlite://"}))
    assert cipher.decrypt(cipher.encrypt(TOKEN)) == TOKEN
    assert list(tmp_path.iterdir()) == []


def test_corrupt_dev_key_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / ".session-sync-dev.key").write_text("not-a-key\n")
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}"})

    with pytest.raises(errors.ConfigError) as raised:
        crypto.TokenCipher.from_settings(settings)

    assert raised.value.variable == "SESSION_SYNC_ENCRYPTION_KEYS"
    assert "not-a-key" not in str(raised.value)


def test_dev_key_in_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'missing' / 'app.db'}"})

    with pytest.raises(errors.ConfigError) as raised:
        crypto.TokenCipher.from_settings(settings)

    assert raised.value.variable == "SESSION_SYNC_ENCRYPTION_KEYS"


def test_generated_keys_are_fresh_fernet_keys() -> None:
    first, second = crypto.generate_key(), crypto.generate_key()
    assert first != second
    assert len(first) == 44 and len(base64.urlsafe_b64decode(first)) == 32
    assert crypto.parse_keys(f"{first},{second}") == [first, second]
