from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from tunneld.core._certs import DevCerts, ensure_dev_certs, load_cert_key_pair
from tunneld.core._errors import ConfigError

DOMAIN = "tunnel.test"
HOSTS = ["127.0.0.1", "::1", "localhost", "", "127.0.0.1", "edge.example"]


def _chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _san(cert: x509.Certificate) -> set[x509.GeneralName]:
    return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


@pytest.fixture
def dev(tmp_path: Path) -> DevCerts:
    return ensure_dev_certs(tmp_path / "data", DOMAIN, HOSTS)


def test_layout_and_modes(dev: DevCerts, tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert dev == DevCerts(
        ca_cert=data / "ca.pem",
        ca_key=data / "ca-key.pem",
        cert=data / "edge-cert.pem",
        key=data / "edge-key.pem",
    )
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE(dev.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(dev.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(dev.ca_cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(dev.cert.stat().st_mode) == 0o644
    assert sorted(p.name for p in data.iterdir()) == sorted(
        ["ca.pem", "ca-key.pem", "edge-cert.pem", "edge-key.pem"]
    )  # no temp files left behind


def test_ca_properties(dev: DevCerts) -> None:
    ca = x509.load_pem_x509_certificate(dev.ca_cert.read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ca.subject.rfc4514_string() == f"CN=tunneld dev CA ({DOMAIN})"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=3649) < life < datetime.timedelta(days=3652)


def test_leaf_properties(dev: DevCerts) -> None:
    leaf, ca = _chain(dev.cert)
    assert ca == x509.load_pem_x509_certificate(dev.ca_cert.read_bytes())
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert _san(leaf) == {
        x509.DNSName(f"*.{DOMAIN}"),
        x509.DNSName(DOMAIN),
        x509.DNSName("localhost"),
        x509.DNSName("edge.example"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    }
    # Deduplicated, not merely equal as a set.
    assert len(list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)) == 6
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(days=825) <= life <= datetime.timedelta(days=826)
    leaf.verify_directly_issued_by(ca)
    load_cert_key_pair(dev.cert, dev.key)


@pytest.mark.parametrize(
    "subject",
    [
        x509.DNSName(f"foo.{DOMAIN}"),
        x509.DNSName(DOMAIN),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
)
def test_chain_verifies_with_cryptography(dev: DevCerts, subject: x509.GeneralName) -> None:
    leaf, *rest = _chain(dev.cert)
    ca = x509.load_pem_x509_certificate(dev.ca_cert.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)  # type: ignore[arg-type]
    chain = verifier.verify(leaf, rest)
    assert chain[-1] == ca


def test_chain_rejects_other_names(dev: DevCerts) -> None:
    from cryptography.x509.verification import VerificationError

    leaf, *rest = _chain(dev.cert)
    ca = x509.load_pem_x509_certificate(dev.ca_cert.read_bytes())
    for subject in (x509.DNSName("a.b.tunnel.test"), x509.DNSName("evil.example")):
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
        with pytest.raises(VerificationError):
            verifier.verify(leaf, rest)


def _handshake(dev: DevCerts, server_hostname: str) -> str:
    """Run a real TLS handshake over loopback; return the client's view of the peer CN."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(dev.cert, dev.key)
    client_ctx = ssl.create_default_context(cafile=str(dev.ca_cert))
    # Strict RFC 5280 checks (the default from Python 3.13) must pass too.
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert client_ctx.check_hostname

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(100))
        except BaseException as exc:  # reported by the client side's assertion
            errors.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.sendall(b"ping")
                assert tls.recv(100) == b"ping"
                peer = tls.getpeercert()
    finally:
        t.join(10)
        listener.close()
    assert not errors, errors
    return dict(x[0] for x in peer["subject"])["commonName"]


@pytest.mark.parametrize("hostname", [f"foo.{DOMAIN}", "127.0.0.1", DOMAIN])
def test_stdlib_ssl_handshake(dev: DevCerts, hostname: str) -> None:
    assert _handshake(dev, hostname) == DOMAIN


def test_stdlib_ssl_rejects_wrong_name(dev: DevCerts) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(dev, "evil.example")


def test_reused_on_second_call(dev: DevCerts, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in (dev.ca_cert, dev.ca_key, dev.cert, dev.key)}
    # Same names in another order / spelling: still the same set, so nothing changes.
    again = ensure_dev_certs(tmp_path / "data", DOMAIN.upper(), list(reversed(HOSTS)))
    assert again == dev
    assert {p: p.read_bytes() for p in before} == before


def test_regenerated_when_hosts_change(dev: DevCerts, tmp_path: Path) -> None:
    ca_before = dev.ca_cert.read_bytes(), dev.ca_key.read_bytes()
    leaf_before = dev.cert.read_bytes(), dev.key.read_bytes()
    ensure_dev_certs(tmp_path / "data", DOMAIN, ["10.0.0.1"])
    assert (dev.ca_cert.read_bytes(), dev.ca_key.read_bytes()) == ca_before
    new_cert, new_key = dev.cert.read_bytes(), dev.key.read_bytes()
    assert new_cert != leaf_before[0] and new_key != leaf_before[1]
    leaf = _chain(dev.cert)[0]
    assert _san(leaf) == {
        x509.DNSName(f"*.{DOMAIN}"),
        x509.DNSName(DOMAIN),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    }
    assert stat.S_IMODE(dev.key.stat().st_mode) == 0o600
    load_cert_key_pair(dev.cert, dev.key)


def test_wildcard_listen_address_becomes_loopback(tmp_path: Path) -> None:
    dev = ensure_dev_certs(tmp_path, "example.test", ["0.0.0.0", "::", "[::1]"])
    assert _san(_chain(dev.cert)[0]) == {
        x509.DNSName("*.example.test"),
        x509.DNSName("example.test"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    }


def test_regenerated_when_not_signed_by_ca(dev: DevCerts, tmp_path: Path) -> None:
    # A new CA (old one deleted) must not keep serving a leaf signed by the old CA.
    dev.ca_cert.unlink()
    dev.ca_key.unlink()
    ensure_dev_certs(tmp_path / "data", DOMAIN, HOSTS)
    ca = x509.load_pem_x509_certificate(dev.ca_cert.read_bytes())
    _chain(dev.cert)[0].verify_directly_issued_by(ca)
    assert _chain(dev.cert)[1] == ca


def test_regenerated_when_expiring(dev: DevCerts, tmp_path: Path) -> None:
    # Re-sign the current leaf with a 10-day lifetime, as if it were old.
    leaf, ca = _chain(dev.cert)
    ca_key = serialization.load_pem_private_key(dev.ca_key.read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=800))
        .not_valid_after(now + datetime.timedelta(days=10))
    )
    for ext in leaf.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    short = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    dev.cert.write_bytes(short.public_bytes(serialization.Encoding.PEM))
    ensure_dev_certs(tmp_path / "data", DOMAIN, HOSTS)
    renewed = _chain(dev.cert)[0]
    assert renewed.not_valid_after_utc - now > datetime.timedelta(days=800)


def test_corrupt_leaf_is_replaced(dev: DevCerts, tmp_path: Path) -> None:
    dev.key.write_bytes(b"garbage")
    ensure_dev_certs(tmp_path / "data", DOMAIN, HOSTS)
    load_cert_key_pair(dev.cert, dev.key)


def test_ca_with_lost_key_is_an_error(dev: DevCerts, tmp_path: Path) -> None:
    dev.ca_key.unlink()
    with pytest.raises(ConfigError, match="ca-key.pem"):
        ensure_dev_certs(tmp_path / "data", DOMAIN, HOSTS)


@pytest.mark.parametrize("domain", ["", "  ", "1.2.3.4", "*.x.test"])
def test_bad_domain(tmp_path: Path, domain: str) -> None:
    with pytest.raises(ConfigError, match="--domain"):
        ensure_dev_certs(tmp_path, domain, [])


def test_existing_data_dir_mode_left_alone(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    ensure_dev_certs(tmp_path, DOMAIN, [])
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


# -- load_cert_key_pair -------------------------------------------------------------------------


def test_load_pair_missing_files(dev: DevCerts, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"^--tls-cert: cannot read {missing}: No such file"):
        load_cert_key_pair(missing, dev.key)
    with pytest.raises(ConfigError, match=rf"^--tls-key: cannot read {missing}: No such file"):
        load_cert_key_pair(dev.cert, missing)


def test_load_pair_garbage(dev: DevCerts, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN NONSENSE-----\nnot base64\n")
    with pytest.raises(ConfigError, match="^--tls-cert: .*junk.pem"):
        load_cert_key_pair(junk, dev.key)
    with pytest.raises(ConfigError, match="^--tls-key: .*junk.pem"):
        load_cert_key_pair(dev.cert, junk)
    # A certificate given as the key is garbage too.
    with pytest.raises(ConfigError, match="^--tls-key: "):
        load_cert_key_pair(dev.cert, dev.cert)


def test_load_pair_mismatched_key(dev: DevCerts) -> None:
    # The CA key is a valid key, just not the leaf's.
    with pytest.raises(ConfigError, match="^--tls-key: .*does not match"):
        load_cert_key_pair(dev.cert, dev.ca_key)


def test_load_pair_encrypted_key(dev: DevCerts, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(dev.key.read_bytes(), None)
    enc = tmp_path / "enc.pem"
    enc.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(ConfigError, match="^--tls-key: .*encrypted"):
        load_cert_key_pair(dev.cert, enc)


def test_load_pair_trustme(tmp_path: Path) -> None:
    # A valid pair from an unrelated CA is accepted.
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("example.test")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    load_cert_key_pair(cert, key)
