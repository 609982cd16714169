"""Secrets at rest: Label Studio tokens and webhook secrets are stored encrypted (Fernet).

The key is ``RLHF_SECRET_KEY`` when set (stretched with HKDF), otherwise a random key the backend
writes once to ``RLHF_DATA_DIR/secret.key`` with mode 0600, so ``make run`` needs no set-up and
every process sharing the data directory (gunicorn workers, job workers, the CLI) reads the same
key. Whoever can read that file can decrypt the tokens in the store beside it: keep the data
directory private, or set ``RLHF_SECRET_KEY`` from a secret manager.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rlhf_core.config import BackendConfig, ConfigError

logger = logging.getLogger(__name__)

KEY_FILE = "secret.key"


class Vault:
    """Encrypts (``seal``) and decrypts (``open``) short secrets with one key."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def for_config(cls, config: BackendConfig) -> Vault:
        if config.secret_key:
            return cls(_derive_key(config.secret_key))
        return cls(_key_file(config.data_dir))

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def open(self, sealed: str | None) -> str | None:
        """The plaintext, or None when nothing is sealed or the key cannot open it."""
        if sealed is None:
            return None
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            logger.warning(
                "a stored secret cannot be decrypted with the current key (RLHF_SECRET_KEY or "
                "secret.key changed?); it is ignored until Label Studio's next /setup"
            )
            return None

    def token_sealer(self, config: BackendConfig) -> Callable[[str], str | None]:
        """How a Label Studio token is stored: sealed, or not at all with LABEL_STUDIO_API_KEY."""
        if config.label_studio_api_key:
            return lambda token: None
        return self.seal


def _derive_key(secret: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"rlhf-backend vault v1")
    return base64.urlsafe_b64encode(hkdf.derive(secret.encode()))


def _key_file(data_dir: Path) -> bytes:
    """The data directory's key, created once (atomically: concurrent processes agree on it)."""
    path = Path(data_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, Fernet.generate_key())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs is used
            logger.info("generated the key that encrypts stored secrets: %s", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users: chmod 600 it", path)
    key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError:
        raise ConfigError(
            f"{path} is not a key this backend wrote; restore it, or delete it (stored Label "
            "Studio tokens are then forgotten until the next /setup)"
        ) from None
    return key
