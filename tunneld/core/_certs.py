"""Certificates for the edge: a private dev-mode CA, and validation of user-given pairs.

In dev mode the edge makes its own CA and signs a leaf for ``*.<domain>``, ``<domain>`` and
the listen hosts, so that agents and browsers can be told to trust one file (``ca.pem``).
Both are reused across restarts so that a CA the user has installed stays valid.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._errors import ConfigError

log = logging.getLogger("tunneld.edge")

CA_VALIDITY = datetime.timedelta(days=3650)
# 825 days is the longest lifetime Apple platforms accept for a TLS server certificate.
LEAF_VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
# Backdate notBefore so that a peer whose clock is a little behind still accepts the cert.
BACKDATE = datetime.timedelta(hours=1)

_WILDCARD_HOSTS = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}


@attrs.frozen
class DevCerts:
    """Paths of the dev CA and of the edge's leaf (``cert`` holds leaf + CA)."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def ensure_dev_certs(data_dir: Path, domain: str, hosts: Sequence[str]) -> DevCerts:
    """Create or reuse the dev CA and an edge leaf valid for ``domain`` and ``hosts``.

    The CA is created once.  The leaf is regenerated when its names differ from the requested
    ones, when it expires within 30 days, or when the CA did not sign it; otherwise reused.
    Raises :class:`ConfigError` for a bad domain or a CA whose key is missing or mismatched
    (we never silently replace a CA the user may have installed).
    """
    data_dir = Path(data_dir)
    names = _leaf_names(domain, hosts)
    ensure_private_dir(data_dir)
    paths = DevCerts(
        ca_cert=data_dir / "ca.pem",
        ca_key=data_dir / "ca-key.pem",
        cert=data_dir / "edge-cert.pem",
        key=data_dir / "edge-key.pem",
    )
    now = _now()
    ca_cert, ca_key = _ensure_ca(paths, _normalise_domain(domain), now)
    if not _leaf_is_current(paths, ca_cert, names, now):
        _write_leaf(paths, ca_cert, ca_key, names, now)
    return paths


def ensure_dev_host_cert(data_dir: Path, host: str) -> tuple[Path, Path]:
    """A leaf for one custom hostname signed by the dev CA: ``certs/HOST.pem`` and ``-key.pem``.

    Made on first use and renewed like the edge's leaf; ConfigError if the dev CA is missing.
    """
    data_dir = Path(data_dir)
    certs = data_dir / "certs"
    ensure_private_dir(certs)
    paths = DevCerts(ca_cert=data_dir / "ca.pem", ca_key=data_dir / "ca-key.pem",
                     cert=certs / f"{host}.pem", key=certs / f"{host}-key.pem")
    ca_cert = _load_cert(paths.ca_cert)
    try:
        ca_key = _load_ec_key(paths.ca_key)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the dev CA key {paths.ca_key}: {exc}") from None
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    now = _now()
    if not _leaf_is_current(paths, ca_cert, names, now):
        _write_leaf(paths, ca_cert, ca_key, names, now)
    return paths.cert, paths.key


def certificate_names(chain: Path) -> list[str]:
    """DNS names (SANs) of the leaf in a PEM chain file, lower-cased; [] if unreadable."""
    try:
        leaf = x509.load_pem_x509_certificates(Path(chain).read_bytes())[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, IndexError, x509.ExtensionNotFound):
        return []
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def name_matches(pattern: str, host: str) -> bool:
    """Whether a certificate name (``*.example.com`` covers one label) covers ``host``."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and "." not in host[: -len(pattern) + 1]
    return pattern == host


def load_cert_key_pair(cert: Path, key: Path, *, cert_flag: str = "--tls-cert",
                       key_flag: str = "--tls-key") -> None:
    """Check a user-given certificate chain and key (``--tls-cert`` / ``--tls-key``).

    Raises :class:`ConfigError` naming the flag (``cert_flag`` / ``key_flag``: the tls tunnel's
    ``--crt`` / ``--key`` use it too) if a file is unreadable, is not PEM, or the key does not
    belong to the first (leaf) certificate of the chain.
    """
    cert_data = _read(cert, cert_flag)
    key_data = _read(key, key_flag)
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise ConfigError(f"{cert_flag}: cannot parse {cert}: no PEM certificate found") from None
    try:
        private_key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        # cryptography raises TypeError when the key is encrypted and no password was given.
        raise ConfigError(f"{key_flag}: cannot use {key}: encrypted keys are not supported") from None
    except ValueError:
        raise ConfigError(f"{key_flag}: cannot parse {key}: no PEM private key found") from None
    except UnsupportedAlgorithm as exc:
        raise ConfigError(f"{key_flag}: cannot use {key}: {exc}") from None
    if _spki(private_key.public_key()) != _spki(chain[0].public_key()):
        raise ConfigError(f"{key_flag}: {key} does not match the certificate in {cert}")


# -- names ------------------------------------------------------------------------------------


def _normalise_domain(domain: str) -> str:
    d = domain.strip().rstrip(".").lower()
    if not d or "*" in d or any(c.isspace() for c in d):
        raise ConfigError(f"--domain: {domain!r} is not a DNS name")
    try:
        ipaddress.ip_address(d)
    except ValueError:
        return d
    # "*.<ip>" would be a meaningless wildcard; an IP belongs in the hosts list.
    raise ConfigError(f"--domain: {domain!r} is an IP address, not a DNS name")


def _leaf_names(domain: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The leaf's SANs in order, deduplicated."""
    d = _normalise_domain(domain)
    names: list[x509.GeneralName] = [x509.DNSName(f"*.{d}"), x509.DNSName(d)]
    for host in hosts:
        h = host.strip()
        if h.startswith("[") and h.endswith("]"):  # "[::1]" as written in a URL
            h = h[1:-1]
        if not h:
            continue
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            names.append(x509.DNSName(h.rstrip(".").lower()))
            continue
        if ip in _WILDCARD_HOSTS:
            # Listening on every interface: no cert can name them all, so cover loopback.
            names.append(x509.DNSName("localhost"))
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        else:
            names.append(x509.IPAddress(ip))
    return list(dict.fromkeys(names))


# -- CA -----------------------------------------------------------------------------------------


def _ensure_ca(
    paths: DevCerts, domain: str, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if paths.ca_cert.exists():
        cert = _load_cert(paths.ca_cert)
        try:
            key = _load_ec_key(paths.ca_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"dev CA {paths.ca_cert} exists but its key {paths.ca_key} is unusable ({exc}); "
                "delete both files to create a new CA"
            ) from None
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise ConfigError(
                f"dev CA key {paths.ca_key} does not match {paths.ca_cert}; "
                "delete both files to create a new CA"
            )
        if cert.not_valid_after_utc - now > RENEW_BEFORE:
            return cert, key
        # A CA about to expire is useless for a new leaf; replace it (and hence the leaf).
    # Without ca.pem nobody can have trusted a stray ca-key.pem, so overwriting it is safe.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tunneld dev CA ({domain})")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between leaves a key without ca.pem, which the next run replaces.
    _atomic_write(paths.ca_key, _key_pem(key), 0o600)
    _atomic_write(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


# -- leaf ---------------------------------------------------------------------------------------


def _leaf_is_current(
    paths: DevCerts, ca_cert: x509.Certificate, names: list[x509.GeneralName], now: datetime.datetime
) -> bool:
    try:
        leaf = x509.load_pem_x509_certificates(paths.cert.read_bytes())[0]
        key = _load_ec_key(paths.key)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        leaf.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        set(san) == set(names)
        and leaf.not_valid_after_utc - now > RENEW_BEFORE
        and _spki(key.public_key()) == _spki(leaf.public_key())
    )


def _write_leaf(
    paths: DevCerts,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
    now: datetime.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    # The common name: the first name that is not a wildcard (the bare domain for the edge leaf).
    first = next(n for n in names if isinstance(n, x509.DNSName) and not n.value.startswith("*."))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first.value)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        # Never outlive the CA: verifiers would reject the tail anyway.
        .not_valid_after(min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
        serialization.Encoding.PEM
    )
    _atomic_write(paths.key, _key_pem(key), 0o600)
    _atomic_write(paths.cert, chain, 0o644)


# -- helpers ------------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {path}: {exc}") from None


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or take write access away from others on an existing one.

    The data dir holds keys, the edge's signing secret and the token store: anyone who may write
    in it may swap ``ca.pem`` or the database.  An existing directory keeps its read bits (its
    files are 0600 anyway) but loses group and other write, with a warning saying so.
    """
    if path.is_dir():
        if os.name != "posix":
            # Windows reports 0o777 for every folder: its access is the ACL's (see _set_mode).
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o022:
            try:
                os.chmod(path, mode & ~0o022)
            except OSError as exc:
                raise ConfigError(f"data dir {path} is writable by others (mode {mode:04o}) and cannot be "
                                  f"changed: {exc.strerror or exc}; chmod go-w {path}") from None
            log.warning("data dir %s was writable by others (mode %04o); now %04o", path, mode,
                        mode & ~0o022)
        return
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise ConfigError(f"data dir {path} exists and is not a directory") from None
        return  # created concurrently
    except OSError as exc:
        raise ConfigError(f"cannot create data dir {path}: {exc.strerror or exc}") from None
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file and rename, so readers never see half a file.

    The temp file is created with ``mode`` already set, so a private key is never readable by
    others, not even for an instant.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # O_BINARY: Windows would otherwise translate newlines (0 elsewhere).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            _set_mode(f.fileno(), tmp, mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _set_mode(fd: int, path: Path, mode: int) -> None:
    """Give the open file ``fd`` (at ``path``) exactly ``mode``: the umask may have narrowed 0644.

    ``os.fchmod`` is POSIX-only before Python 3.13.  On Windows permission bits mean nothing
    beyond read-only: the file gets the ACL it inherits from its folder, which for the default
    data dir (under the user's profile) is the user's, SYSTEM's and the Administrators' alone.
    """
    fchmod = getattr(os, "fchmod", None)
    if fchmod is not None and os.name == "posix":
        fchmod(fd, mode)
    elif os.name == "posix":  # pragma: no cover - every POSIX Python has fchmod
        os.chmod(path, mode)
