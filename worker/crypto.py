"""Tokens at rest: Fernet encryption with key rotation, and keyed hashes for lookups.

``SESSION_SYNC_ENCRYPTION_KEYS`` holds comma-separated Fernet keys (urlsafe base64 of 32 bytes):
the first encrypts and keys the lookup hash, all of them decrypt. To rotate, put a new key first,
re-encrypt rows with :meth:`TokenCipher.rotate` (and re-hash them with :meth:`TokenCipher.lookup_hash`),
then drop the old key. Until then :meth:`TokenCipher.lookup_hashes` finds rows hashed under any key.

No message raised or logged here ever contains a key, a token or a ciphertext.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worker import errors

if TYPE_CHECKING:  # for typing only: settings checks its keys with this module, so crypto sits below it
    from worker.settings import Settings

logger = logging.getLogger(__name__)

#: The environment variable holding the keys (named in every ConfigError raised here).
KEYS_VARIABLE = "SESSION_SYNC_ENCRYPTION_KEYS"
#: File name of the generated development key, written next to the SQLite database.
DEV_KEY_FILENAME = ".session-sync-dev.key"
#: HKDF ``info`` deriving the lookup-hash key from a Fernet key (part of the database contract).
LOOKUP_KEY_INFO = b"session-sync token lookup v1"

_UNDECRYPTABLE = f"stored token could not be decrypted with any key in {KEYS_VARIABLE}"


def generate_key() -> str:
    """A new random Fernet key, as it goes into SESSION_SYNC_ENCRYPTION_KEYS."""
    return Fernet.generate_key().decode("ascii")


def parse_keys(value: str) -> list[str]:
    """The keys in a comma-separated SESSION_SYNC_ENCRYPTION_KEYS value; ConfigError if any is malformed."""
    keys = [part.strip() for part in value.split(",")]
    if keys == [""]:
        raise errors.ConfigError(KEYS_VARIABLE, "is empty; expected comma-separated Fernet keys")
    for position, key in enumerate(keys, start=1):
        _check_key(key, position, len(keys))
    return keys


def _check_key(key: str, position: int, count: int) -> None:
    where = f"key {position} of {count}"
    if not key:
        raise errors.ConfigError(KEYS_VARIABLE, f"{where} is empty (stray comma?)")
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise errors.ConfigError(
            KEYS_VARIABLE,
            f"{where} is not a Fernet key (urlsafe base64 of 32 bytes, 44 characters; "
            "make one with: python -c 'from worker import crypto; print(crypto.generate_key())')",
        ) from None


def _lookup_key(fernet_key: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LOOKUP_KEY_INFO).derive(
        base64.urlsafe_b64decode(fernet_key)
    )


class TokenCipher:
    """Encrypts tokens for storage and hashes them for lookups, under a list of keys."""

    __slots__ = ("_fernet", "_lookup_keys")

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise errors.ConfigError(KEYS_VARIABLE, "no keys given")
        for position, key in enumerate(keys, start=1):
            _check_key(key, position, len(keys))
        self._fernet = MultiFernet([Fernet(key) for key in keys])
        self._lookup_keys = [_lookup_key(key) for key in keys]

    def __repr__(self) -> str:
        return f"TokenCipher(<{len(self._lookup_keys)} keys>)"

    @classmethod
    def from_settings(cls, config: Settings) -> TokenCipher:
        """The cipher for SESSION_SYNC_ENCRYPTION_KEYS; without it, a development key (SQLite only)."""
        if config.encryption_keys is not None:
            return cls(parse_keys(config.encryption_keys.get_secret_value()))
        if not config.is_sqlite:
            raise errors.ConfigError(KEYS_VARIABLE, "not set (required with PostgreSQL)")
        return cls([load_dev_key(config.database_url)])

    def encrypt(self, token: str) -> str:
        """Fernet ciphertext of ``token`` under the first key (text, safe to store)."""
        return self._fernet.encrypt(token.encode("utf-8")).decode("ascii")

    def decrypt(self, ciphertext: str) -> str:
        """The token inside ``ciphertext``; CryptoError if no configured key opens it."""
        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise errors.CryptoError(_UNDECRYPTABLE) from None

    def rotate(self, ciphertext: str) -> str:
        """``ciphertext`` re-encrypted under the first key; CryptoError if no configured key opens it."""
        try:
            return self._fernet.rotate(ciphertext.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError):
            raise errors.CryptoError(_UNDECRYPTABLE) from None

    def lookup_hash(self, token: str) -> str:
        """Hex HMAC-SHA256 of ``token`` under the first key's lookup key (what new rows store)."""
        return _hmac(self._lookup_keys[0], token)

    def lookup_hashes(self, token: str) -> list[str]:
        """One hash per configured key, first key first: query ``active_token_hash IN (...)``."""
        return [_hmac(key, token) for key in self._lookup_keys]


def _hmac(key: bytes, token: str) -> str:
    return hmac.new(key, token.encode("utf-8"), hashlib.sha256).hexdigest()


def dev_key_path(database_url: str) -> Path | None:
    """Where the development key of a SQLite database lives (None: in-memory database)."""
    database = sa.make_url(database_url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve().parent / DEV_KEY_FILENAME


def load_dev_key(database_url: str) -> str:
    """The development key for a SQLite database: read from its key file, or generated and saved once."""
    path = dev_key_path(database_url)
    if path is None:
        logger.warning(
            "%s is not set: DEVELOPMENT MODE, tokens are encrypted with a throwaway key (in-memory database)",
            KEYS_VARIABLE,
            extra={"action": "dev_key_in_use"},
        )
        return generate_key()
    try:
        key = _read_key_file(path) if path.exists() else _create_key_file(path)
    except OSError as exc:
        raise errors.ConfigError(
            KEYS_VARIABLE, f"not set, and the development key file {path}: {exc.strerror}"
        ) from None
    logger.warning(
        "%s is not set: DEVELOPMENT MODE, tokens are encrypted with the generated key in %s. "
        "Never run like this in production: set %s.",
        KEYS_VARIABLE,
        path,
        KEYS_VARIABLE,
        extra={"action": "dev_key_in_use"},
    )
    return key


def _read_key_file(path: Path) -> str:
    key = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise errors.ConfigError(
            KEYS_VARIABLE, f"not set, and the development key file {path} does not hold a Fernet key"
        ) from None
    return key


def _create_key_file(path: Path) -> str:
    # Write a private temporary file, then link it into place: readers never see a partial key,
    # and when two processes race, the first link wins and both use its key.
    key = generate_key()
    fd, tmp = tempfile.mkstemp(prefix=DEV_KEY_FILENAME, dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(key + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key_file(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return key
