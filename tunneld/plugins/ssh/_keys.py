"""Who may use the SSH gateway: public keys, and the owner each one maps to.

The gateway asks a :class:`KeyLookup` about every key a client offers: the operator's
``DATA_DIR/authorized_keys`` (OpenSSH format), then the keys accounts registered through the
admin API (``ssh_credentials`` in the store).

Nothing here imports trio or asyncio: lookups are cheap and run on the SSH thread.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Protocol

import asyncssh
import attrs

from tunneld.plugin import DEFAULT_ACCOUNT

log = logging.getLogger("tunneld.ssh")

#: Key types accepted, and the least RSA modulus size (OpenSSH's own floor is 1024; ngrok's docs
#: and current advice say 2048).
KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
MIN_RSA_BITS = 2048


@attrs.frozen
class SshCredential:
    """One key allowed to log in, and whose names its tunnels claim."""

    #: Owner id of the key's names and holds (``ssh:SHA256:...``): stable as long as the key is.
    owner: str
    #: ``SHA256:...``, as ``ssh-keygen -lf`` prints it.
    fingerprint: str
    #: The key's comment in the file (for logs).
    comment: str = ""
    #: The account the key belongs to (``authorized_keys``: the default account).
    account_id: str = DEFAULT_ACCOUNT
    #: The key's ``bind:`` ACL (registered keys may have one; empty = unrestricted).
    acl: tuple[str, ...] = ()
    #: The ``ssh_credentials`` record's id (``sshc_…``); "" for a key of ``authorized_keys``.
    credential_id: str = ""


class KeyLookup(Protocol):
    """Maps an offered public key to its credential, or None for a key that may not log in."""

    def lookup(self, key: asyncssh.SSHKey) -> SshCredential | None: ...


def key_refusal(key: asyncssh.SSHKey) -> str | None:
    """Why ``key``'s type or size is not accepted, or None when it is."""
    algorithm = key.algorithm.decode("ascii", "replace")
    if algorithm not in KEY_TYPES:
        return f"key type {algorithm} is not accepted (use ed25519, ecdsa or rsa >= {MIN_RSA_BITS} bits)"
    if algorithm == "ssh-rsa":
        bits = int(getattr(key.pyca_key, "key_size", 0))
        if bits < MIN_RSA_BITS:
            return f"RSA key of {bits} bits is too short (at least {MIN_RSA_BITS})"
    return None


def owner_of(key: asyncssh.SSHKey) -> str:
    # The fingerprint rather than the account's token: a key needs no token, and one person's
    # several keys are told apart in the logs.  Later, a control plane maps keys to accounts.
    return "ssh:" + key.get_fingerprint("sha256")


@attrs.define(eq=False)
class AuthorizedKeysFile:
    """``DATA_DIR/authorized_keys``, re-read when its modification time or size changes.

    Lines with OpenSSH options (``restrict``, ``from=...``) are skipped with a warning: options
    the gateway cannot enforce are refused, never ignored.  A missing file allows nobody.
    """

    path: Path
    _stamp: tuple[float, int] | None = None
    _keys: dict[bytes, SshCredential] = attrs.field(factory=dict)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def lookup(self, key: asyncssh.SSHKey) -> SshCredential | None:
        with self._lock:
            self._refresh()
            return self._keys.get(key.public_data)

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._keys = None, {}
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            text = self.path.read_text("utf-8", "replace")
        except OSError as exc:
            log.error("cannot read %s: %s; no SSH key may log in", self.path, exc)
            self._keys = {}
            return
        self._keys = parse_authorized_keys(text, str(self.path))
        log.info("%s: %d SSH key(s) allowed", self.path, len(self._keys))


def parse_authorized_keys(text: str, source: str = "authorized_keys") -> dict[bytes, SshCredential]:
    """Public key blob → credential, for every usable line of an OpenSSH authorized_keys text."""
    keys: dict[bytes, SshCredential] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if fields[0] not in KEY_TYPES and not fields[0].startswith(("ssh-", "ecdsa-", "sk-")):
            log.warning("%s:%d: key options are not supported by tunneld; line skipped", source, lineno)
            continue
        try:
            key = asyncssh.import_public_key(" ".join(fields[:2]))
        except (asyncssh.KeyImportError, ValueError, IndexError) as exc:
            log.warning("%s:%d: not a public key (%s); line skipped", source, lineno, exc)
            continue
        refusal = key_refusal(key)
        if refusal:
            log.warning("%s:%d: %s; line skipped", source, lineno, refusal)
            continue
        keys[key.public_data] = SshCredential(owner_of(key), key.get_fingerprint("sha256"),
                                              fields[2] if len(fields) > 2 else "")
    return keys


class _CredentialStore(Protocol):
    def ssh_credential_for_key(self, public_key: str) -> Any: ...


@attrs.define(eq=False)
class RegisteredKeys:
    """``authorized_keys`` first, then the ``ssh_credentials`` accounts registered in the store.

    The store is asked on the SSH thread (one indexed SELECT per offered key; SQLite serialises
    access from several threads itself).
    """

    file: KeyLookup
    store: _CredentialStore

    def lookup(self, key: asyncssh.SSHKey) -> SshCredential | None:
        found = self.file.lookup(key)
        if found is not None:
            return found
        line = key.export_public_key("openssh").decode("ascii", "replace")
        record = self.store.ssh_credential_for_key(line)
        if record is None or key_refusal(key) is not None:
            return None
        return SshCredential(owner_of(key), key.get_fingerprint("sha256"),
                             f"{record.id} ({record.account_id})", record.account_id, tuple(record.acl),
                             record.id)
