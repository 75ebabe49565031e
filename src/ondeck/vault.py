"""Encryption at rest for secrets (Fernet: AES-128-CBC with HMAC-SHA256).

The key comes from ``ONDECK_MASTER_KEY`` or a key file created with mode 0600
in the data directory. After ``rotate``, old ciphertexts still decrypt
(MultiFernet) until they are re-encrypted.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ondeck.errors import OndeckError

KEY_FILE = "master.key"


class VaultError(OndeckError):
    code = "vault"
    status = 500
    title = "Secret encryption error"


class Vault:
    def __init__(self, keys: list[bytes], path: Path | None = None) -> None:
        if not keys:
            raise VaultError("no master key")
        self.keys = keys
        self._path = path
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    @classmethod
    def open(cls, data_dir: Path, master_key: str | None) -> Vault:
        """The configured key, or the data dir's key file (created on first use)."""
        if master_key:
            return cls([k.strip().encode() for k in master_key.split(",") if k.strip()])
        path = data_dir / KEY_FILE
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(Fernet.generate_key())
        return cls(cls._read(path), path)

    @staticmethod
    def _read(path: Path) -> list[bytes]:
        return [line.strip() for line in path.read_bytes().splitlines() if line.strip()]

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            pass
        if self._path is not None and self._path.exists():
            # Another process may have rotated the key file since this one read it.
            self.keys = self._read(self._path)
            self._fernet = MultiFernet([Fernet(k) for k in self.keys])
            try:
                return self._fernet.decrypt(ciphertext.encode()).decode()
            except InvalidToken:
                pass
        raise VaultError("a secret cannot be decrypted with the configured master key")

    def rotated(self) -> Vault:
        """A vault whose newest key encrypts and whose old keys still decrypt."""
        return Vault([Fernet.generate_key(), *self.keys])

    def reencrypt(self, ciphertext: str) -> str:
        return self._fernet.rotate(ciphertext.encode()).decode()

    def save(self, data_dir: Path) -> Path:
        """Write the keys, newest first, to the key file (mode 0600)."""
        path = data_dir / KEY_FILE
        temporary = path.with_suffix(".new")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(b"\n".join(self.keys) + b"\n")
        temporary.replace(path)
        return path
