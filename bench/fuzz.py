"""Long-run fuzzing of tunneld's parsers (issue 11); not run in CI.

    python bench/fuzz.py --target frames --runs 1000000      # one target
    python bench/fuzz.py --all --runs 1000000                # every target, one after the other
    python bench/fuzz.py --all --engine mutate --runs 100000 # pure-Python engine (no atheris)

Targets: ``frames`` (muxado FrameDecoder), ``messages`` (JSON codec, JsonObjectReader,
ProxyHeaderReader), ``clienthello`` (SNI reader), ``proxyproto`` (PROXY header writer and reader),
``config`` (agent YAML config loader).

Engines:

* ``atheris`` (default when importable; ``pip install atheris``, bench only): coverage-guided
  libFuzzer.  Each target runs in a child process (libFuzzer exits when done) with ``-timeout``
  as the per-input time limit; its corpus is kept in ``--workdir/<target>/corpus`` and crash
  or timeout reproducers in ``--workdir/<target>/artifacts``.
* ``mutate``: a pure-Python mutation fuzzer (bit flips, interesting integers, insert, delete,
  duplicate, splice, dictionary tokens) over a seed corpus; inputs that give a new outcome are
  kept.  Each input runs under a ``setitimer`` alarm.

Every target checks more than "no unexpected exception": the same answer however the input is
split, buffers within their stated bounds after every call, and round trips where there is an
encoder.  Only the module's own errors (RemoteProtocolError, ConfigError) are allowed.  At the
end the driver prints per target: inputs run, corpus size, crashes/hangs and peak RSS.
Reproduce one input with ``python bench/fuzz.py --target T --replay FILE``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("frames", "messages", "clienthello", "proxyproto", "config")


class Hang(Exception):
    """Raised by the per-input alarm of the mutate engine."""


# ---------------------------------------------------------------------------------------------
# Helpers shared by the targets


def chunks(data: bytes, seed: int) -> Iterator[bytes]:
    """Split ``data`` deterministically by ``seed``: whole, byte by byte, small or large pieces."""
    style = seed & 3
    if style == 0 or not data:
        yield data
        return
    if style == 1 and len(data) <= 512:
        for i in range(len(data)):
            yield data[i : i + 1]
        return
    top = 16 if style == 2 else 700
    x = (seed * 2654435761 + len(data)) & 0xFFFFFFFF
    pos = 0
    while pos < len(data):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        n = 1 + (x >> 8) % top
        yield data[pos : pos + n]
        pos += n


# ---------------------------------------------------------------------------------------------
# Targets: each has seeds() -> list[bytes] and check(data) (raises on a finding).  The first
# byte of an input selects the mode / split; the rest is the payload.


class FramesTarget:
    max_len = 70000

    def __init__(self) -> None:
        from tunneld.core import proto
        from tunneld.core.proto import _frames

        self.p = proto
        self.f = _frames

    def seeds(self) -> list[bytes]:
        p = self.p
        frames = [
            p.encode_data(1, b"hello", syn=True), p.encode_data(1, b"", fin=True),
            p.encode_data(3, b"x" * 300),
            p.encode_rst(5, 7), p.encode_wndinc(1, 65536), p.encode_goaway(9, 0, b"bye"),
            p.encode_data(2, b"\x00\x00\x00\x03" + b"{}" * 8, syn=True, fin=True),
        ]
        out = [bytes([c]) + f for c in (0, 1, 2, 3) for f in frames]
        out.append(b"\x02" + b"".join(frames))
        out.append(b"\x03" + b"".join(frames[:5]) * 3 + frames[5])
        return out

    @staticmethod
    def canonical(events: list) -> list:
        """Merge DATA pieces of one frame (and frames that continue one stream without SYN/FIN)."""
        out: list = []
        for e in events:
            if out and type(e).__name__ == "Data" and isinstance(out[-1], tuple):
                _, sid, data, syn, fin = out[-1]
                if sid == e.stream_id and not fin and not e.syn:
                    out[-1] = ("Data", sid, data + e.data, syn, e.fin)
                    continue
            if type(e).__name__ == "Data":
                out.append(("Data", e.stream_id, e.data, e.syn, e.fin))
            else:
                out.append(e)
        return out

    def run(self, payload: bytes, seed: int, max_data: int) -> tuple[list, str | None]:
        dec = self.f.FrameDecoder(max_data)
        events: list = []
        bound = self.f.HEADER_SIZE + self.f.MAX_CONTROL_FRAME
        try:
            for chunk in chunks(payload, seed):
                got = dec.receive_data(chunk)
                # Progress: every event needs at least one new byte; data never exceeds the input.
                assert len(got) <= len(chunk), (len(got), len(chunk))
                assert sum(len(e.data) for e in got if isinstance(e, self.f.Data)) <= len(chunk)
                assert len(dec._buf) <= bound, len(dec._buf)
                events += got
        except self.p.RemoteProtocolError as exc:
            return self.canonical(events), f"{exc} ({exc.code})"
        return self.canonical(events), None

    def check(self, data: bytes) -> None:
        ctrl = data[0] if data else 0
        payload = data[1:]
        max_data = (0xFFFFFF, 256 * 1024, 64, 1)[(ctrl >> 2) & 3]
        whole, err = self.run(payload, 0, max_data)
        split, err2 = self.run(payload, ctrl | 1, max_data)
        assert err == err2, (err, err2)
        if err is None:  # (after an error the whole run lost its events with the exception)
            assert whole == split, (whole, split)


class MessagesTarget:
    max_len = 20000

    def __init__(self) -> None:
        from tunneld.core import _errors
        from tunneld.core import proto as m

        self.m = m
        self.errors = _errors

    def seeds(self) -> list[bytes]:
        m = self.m
        classes = list(m.MESSAGE_CLASSES)
        samples = {
            m.Auth: b'{"Version":["3"],"ClientId":"","Extra":{"OS":"linux","Arch":"amd64","Authtoken":"t",'
            b'"HeartbeatInterval":10000000000,"UpdateUnsupportedError":null,"TunneldWindow":0}}',
            m.Bind: b'{"Id":"x","Proto":"http","ForwardsTo":"localhost:80","Opts":{"Hostname":"a.b",'
            b'"Auth":"","BasicAuth":[{"u":1.5e3}],"X":[true,false,null]},"Extra":{"Name":"n"}}',
            m.BindResp: b'{"ID":"t","URL":"https://a.b","Proto":"https","Opts":{},"Error":"","Extra":'
            b'{"Token":"","TunnelID":"x"}}',
            m.ProxyHeader: b'{"Id":"t","ClientAddr":"1.2.3.4:5","Proto":"https","EdgeType":"3",'
            b'"PassthroughTLS":false}',
            m.AuthResp: b'{"Version":"2","ClientId":"c","Error":"","Extra":{"Region":"eu",'
            b'"SessionDuration":1}}',
            m.StartTunnelWithLabel: b'{"Labels":{"edge":"e"},"ForwardsTo":"x","Metadata":"\\ud800"}',
            m.StopTunnel: b'{"Id":"t","Message":"m","ErrorCode":"E"}\n',
            m.Update: b'{"Version":"1.2","PermitMajorVersion":true}',
        }
        out = []
        for cls, body in samples.items():
            c = classes.index(cls) << 2
            out += [bytes([c | mode]) + body for mode in range(3)]
            out.append(bytes([c | 2]) + b"  " + body + b"trailing")
        ph = m.encode_proxy_stream_prefix(m.ProxyHeader(id="x", client_addr="1.2.3.4:5", proto="tcp"))[4:]
        out += [bytes([3 | (i << 4)]) + ph + b"payload" for i in range(4)]
        out.append(bytes([0x08]) + b"[" * 50 + b"]" * 50)
        out.append(bytes([0x10]) + b'{"a":' + b"9" * 30 + b"}")
        return out

    def roundtrip(self, cls: type, msg: object) -> None:
        m = self.m
        try:
            enc = m.encode_message(msg)
        except self.errors.LocalProtocolError as exc:
            raise AssertionError(f"decoded {cls.__name__} cannot be re-encoded: {exc}") from exc
        again = m.decode_message(cls, enc)
        assert again == msg, (msg, again)

    def check(self, data: bytes) -> None:
        m = self.m
        remote = self.errors.RemoteProtocolError
        ctrl = data[0] if data else 0
        payload = data[1:]
        mode = ctrl & 3
        cls = m.MESSAGE_CLASSES[(ctrl >> 2) % len(m.MESSAGE_CLASSES)]
        if mode == 0 or mode == 1:
            src: bytes | str = payload if mode == 0 else payload.decode("utf-8", "surrogateescape")
            try:
                msg = m.decode_message(cls, src)
            except remote:
                return
            self.roundtrip(cls, msg)
        elif mode == 2:
            max_size = (m.MAX_MESSAGE_SIZE, 64, 1024, 8)[(ctrl >> 5) & 3]
            depth = 128 if ctrl & 0x80 else 3
            results = []
            for seed in (0, ctrl | 1):
                reader = m.JsonObjectReader(max_size, max_depth=depth)
                obj = None
                fed = 0
                try:
                    for chunk in chunks(payload, seed):
                        fed += len(chunk)
                        obj = reader.feed(chunk)
                        if obj is not None:
                            break
                        assert len(reader._buf) <= max_size, (len(reader._buf), max_size)
                    if obj is None:
                        try:
                            reader.feed_eof()
                        except remote:
                            pass
                        else:
                            raise AssertionError("feed_eof accepted an incomplete object")
                except remote:
                    results.append("error")
                    continue
                if obj is None:
                    results.append(None)
                    continue
                used = fed - len(reader.leftover)
                assert payload[used:fed] == reader.leftover and used > 0
                results.append((obj, payload[used:]))
                try:
                    msg = m.decode_message(cls, obj)
                except remote:
                    continue
                self.roundtrip(cls, msg)
            assert results[0] == results[1], results
        else:
            max_size = (m.MAX_MESSAGE_SIZE, 64, 1024, 0)[(ctrl >> 5) & 3]
            if len(payload) >= 4:
                assert 0 <= m.decode_stream_type(payload[:4]) <= 0xFFFFFFFF
            results = []
            for seed in (0, ctrl | 1):
                reader = m.ProxyHeaderReader(max_size)
                hdr = None
                fed = 0
                try:
                    for chunk in chunks(payload, seed):
                        fed += len(chunk)
                        hdr = reader.feed(chunk)
                        if hdr is not None:
                            break
                        assert len(reader._buf) <= 8 + max_size, (len(reader._buf), max_size)
                except remote:
                    results.append("error")
                    continue
                if hdr is None:
                    results.append(None)
                    continue
                used = fed - len(reader.leftover)
                assert payload[used:fed] == reader.leftover
                results.append((hdr, payload[used:]))
                self.roundtrip(m.ProxyHeader, hdr)
            assert results[0] == results[1], results


class ClientHelloTarget:
    max_len = 40000

    def __init__(self) -> None:
        from tunneld.plugins.tls import _clienthello as ch

        self.ch = ch

    def seeds(self) -> list[bytes]:
        try:
            import fuzz_clienthello  # the real ClientHellos (Python ssl, pyOpenSSL)

            hellos = list(fuzz_clienthello.SEEDS)
        except Exception:  # noqa: BLE001 - only a seed source
            hellos = []
        hellos.append(synthetic_hello("example.com"))
        hellos.append(synthetic_hello(None))
        return [bytes([c]) + h for c in (0, 1, 2, 6, 0x80) for h in hellos]

    def run(self, payload: bytes, seed: int, max_size: int) -> object:
        ch = self.ch
        parser = ch.ClientHelloParser(max_size)
        result: object = ch.NEED_MORE
        for chunk in chunks(payload, seed):
            result = parser.feed(chunk)
            if result is not ch.NEED_MORE:
                break
            assert len(parser._buf) < 5 + ch.MAX_FRAGMENT, len(parser._buf)
            assert len(parser._hello) < 4 + max_size, len(parser._hello)
        return result

    def check(self, data: bytes) -> None:
        ch = self.ch
        ctrl = data[0] if data else 0
        payload = data[1:]
        max_size = ch.MAX_CLIENT_HELLO if ctrl & 0x80 == 0 else 64
        whole = self.run(payload, 0, max_size)
        split = self.run(payload, ctrl | 1, max_size)
        assert whole == split, (whole, split)
        assert whole is ch.NEED_MORE or isinstance(whole, (ch.Done, ch.Error)), whole
        if isinstance(whole, ch.Done):
            assert 0 < whole.consumed <= len(payload), whole
            name = whole.server_name
            assert name is None or re.fullmatch(r"[a-z0-9_][a-z0-9_.-]*", name) and ".." not in name, name
        if isinstance(whole, ch.Error):
            assert whole.kind in ("not_tls", "malformed", "too_large"), whole


def synthetic_hello(name: str | None) -> bytes:
    """A minimal TLS 1.2 ClientHello record with (or without) SNI."""
    ext = b""
    if name is not None:
        host = name.encode()
        entry = b"\x00" + struct.pack("!H", len(host)) + host
        sni = struct.pack("!H", len(entry)) + entry
        ext = struct.pack("!HH", 0, len(sni)) + sni + struct.pack("!HH", 0x2B, 3) + b"\x02\x03\x04"
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(ext)) + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


class ProxyProtoTarget:
    max_len = 600

    def __init__(self) -> None:
        import ipaddress

        from tunneld.core import _errors
        from tunneld.core.proto import _proxyproto as pp

        self.pp = pp
        self.ip = ipaddress
        self.errors = _errors

    def seeds(self) -> list[bytes]:
        pp = self.pp
        heads = [
            pp.encode_proxy_header(1, "192.0.2.1:56324", "198.51.100.7:443"),
            pp.encode_proxy_header(2, "192.0.2.1:56324", "198.51.100.7:443"),
            pp.encode_proxy_header(1, "[2001:db8::1]:1", "[::1]:443"),
            pp.encode_proxy_header(2, "[2001:db8::1]:1", "[::1]:443"),
            pp.encode_proxy_header(1, "x", "y"), pp.encode_proxy_header(2, "x", "y"),
        ]
        out = [bytes([0]) + h + b"GET / HTTP/1.1\r\n" for h in heads]
        out += [b"\x01192.0.2.1:56324|198.51.100.7:443", b"\x01[2001:db8::1]:1|[::ffff:1.2.3.4]:443",
                b"\x02" + bytes(range(40)), b"\x03" + bytes(range(100, 140))]
        return out

    def check(self, data: bytes) -> None:
        pp = self.pp
        ctrl = data[0] if data else 0
        payload = data[1:]
        mode = ctrl & 3
        if mode == 0:
            self.check_reader(payload)
        elif mode == 1:
            text = payload.decode("utf-8", "replace")
            src, _, dst = text.partition("|")
            for version in (1, 2):
                try:
                    head = pp.encode_proxy_header(version, src, dst)
                except self.errors.LocalProtocolError as exc:
                    raise AssertionError(f"writer refused {src!r} {dst!r}: {exc}") from exc
                info = pp.parse_proxy_header(head + b"tail")
                assert info is not None and info.length == len(head), (head, info)
                self.check_reader(head + payload[:20])
        else:
            # Structured: two addresses of 4 or 16 bytes from the payload, exact round trip.
            ip = self.ip
            raw = payload.ljust(36, b"\x00")
            a = ip.IPv4Address(raw[:4]) if ctrl & 4 else ip.IPv6Address(raw[:16])
            b = ip.IPv4Address(raw[16:20]) if ctrl & 8 else ip.IPv6Address(raw[16:32])
            sport, dport = struct.unpack("!HH", raw[32:36])

            def hostport(x: object, port: int) -> str:
                return f"[{x}]:{port}" if ":" in str(x) else f"{x}:{port}"

            def norm(x: object) -> object:
                if isinstance(x, ip.IPv6Address) and x.ipv4_mapped is not None:
                    return x.ipv4_mapped
                return x

            na, nb = norm(a), norm(b)
            for version in (1, 2):
                head = pp.encode_proxy_header(version, hostport(a, sport), hostport(b, dport))
                info = pp.parse_proxy_header(head)
                assert info is not None and info.length == len(head)
                assert info.source and info.destination
                if na.version == nb.version:
                    assert info.source == (str(na), sport), (info, a)
                    assert info.destination == (str(nb), dport), (info, b)
                else:  # one header, one family: the IPv4 side is written IPv4-mapped
                    assert norm(ip.ip_address(info.source[0])) == na and info.source[1] == sport, (info, a)
                    assert norm(ip.ip_address(info.destination[0])) == nb, (info, b)

    def check_reader(self, payload: bytes) -> None:
        pp = self.pp
        try:
            info = pp.parse_proxy_header(payload)
        except self.errors.RemoteProtocolError:
            info = "error"
        if isinstance(info, pp.ProxyProtocolInfo):
            assert 0 < info.length <= len(payload), info
            assert pp.parse_proxy_header(payload[: info.length]) == info
            # Every shorter prefix is incomplete (never an error, never another header).
            for k in {0, 1, 5, 6, 11, 12, 15, info.length - 1}:
                if 0 <= k < info.length:
                    assert pp.parse_proxy_header(payload[:k]) is None, (k, info)
            if info.source is not None and info.destination is not None:
                (s, sp), (d, dp) = info.source, info.destination
                def host(h: str, p: int) -> str:
                    return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

                again = pp.parse_proxy_header(pp.encode_proxy_header(info.version, host(s, sp), host(d, dp)))
                assert again is not None
                assert (again.source, again.destination) == (info.source, info.destination) or "%" in s + d
        elif info is None:
            assert len(payload) < 16 + 65535


class ConfigTarget:
    max_len = 4000

    def __init__(self) -> None:
        from tunneld.core import _config, _errors

        self.c = _config
        self.errors = _errors
        self.where = re.compile(r"config line \d+: \S[^\n]*\Z")  # names the line, on one line
        _config.parse_agent_config("tunnels: {t: {proto: tcp, addr: 1}}\n")  # load plugins up front

    def seeds(self) -> list[bytes]:
        docs = [
            b'version: "2"\nauthtoken: tkd_abc\nserver_addr: tunnels.example.com:4443\nroot_cas: host\n'
            b"web_addr: 127.0.0.1:4040\nheartbeat_interval: 10s\ntunnels:\n"
            b"  web: {proto: http, addr: 8080, subdomain: myapp, schemes: [https],"
            b" basic_auth: ['u:password1']}\n"
            b"  ssh: {proto: tcp, addr: 22, proxy_proto: 2, remote_addr: 'x:1'}\n"
            b"  t: {proto: tls, addr: 443, crt: a.pem, key: b.pem, inspect: false}\n",
            b"version: 2\nweb_addr: false\nlog_level: debug\nheartbeat_tolerance: 1500ms\n",
            b"tunnels:\n  a:\n    proto: http\n    addr: 1\n    auth: 'user:password'\n"
            b"    host_header: rewrite\n"
            b"    bind_tls: both\n    domain: x.example\n",
            b"a: &x [1, 2]\nb: *x\n",
            b"tunnels: ~\n",
            b"authtoken: !!binary aGVsbG8=\nheartbeat_interval: 1.5\n",
        ]
        return [bytes([c]) + d for c in (0, 1, 2) for d in docs]

    def check(self, data: bytes) -> None:
        c = self.c
        ctrl = data[0] if data else 0
        payload = data[1:]
        src: bytes | str = payload if ctrl & 1 else payload.decode("utf-8", "replace")
        try:
            cfg = c.parse_agent_config(src)
        except self.errors.ConfigError as exc:
            assert self.where.match(str(exc)), str(exc)
            return
        assert 1 <= cfg.heartbeat_interval <= 86400 and 1 <= cfg.heartbeat_tolerance <= 86400, cfg
        for t in cfg.tunnels.values():
            assert isinstance(t.proto, str) and isinstance(t.addr, str)


Target = FramesTarget | MessagesTarget | ClientHelloTarget | ProxyProtoTarget | ConfigTarget


def make_target(name: str) -> Target:
    return {
        "frames": FramesTarget, "messages": MessagesTarget, "clienthello": ClientHelloTarget,
        "proxyproto": ProxyProtoTarget, "config": ConfigTarget,
    }[name]()


DICTIONARY: dict[str, list[bytes]] = {
    "frames": [b"\x00\x00\x04\x00", b"\x00\x00\x04\x20", b"\x00\x00\x08\x30", b"\x00\x01\x00\x13",
               b"\xff\xff\xff\x11", b"\x80\x00\x00\x01", b"\x00\x00\x00\x00"],
    "messages": [b'"Extra"', b'"Opts"', b'"Version"', b'"ID"', b'"Id"', b'"URL"', b'"AuthToken"',
                 b'"Authtoken"', b'"HeartbeatInterval"', b'"PassthroughTLS"', b'"Labels"', b"null", b"true",
                 b"false", b"1e999", b"-1e999", b"9223372036854775808", b"-9223372036854775809", b'"\\ud800"',
                 b'"\\u0000"', b"\\\\", b'\\"', b"[[[[", b"{}", b"[]", b"\xc3\x28", b"\xed\xa0\x80", b"NaN",
                 b"Infinity", b"1.0", b"-0", b"\xff\xff\xff\xff\xff\xff\xff\x7f"],
    "clienthello": [b"\x16\x03\x01", b"\x16\x03\x03", b"\x00\x00", b"\x00\x2b", b"\x00\x10", b"\xff\xff",
                    b"\x40\x00", b"\x01\x00\x00"],
    "proxyproto": [b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"\r\n", b"\r\n\r\n\x00\r\nQUIT\n", b"\x21\x11",
                   b"\x21\x21", b"\x20\x00", b"\x00\x0c", b"\x00\x24", b"65535", b"::ffff:", b"%eth0", b"[",
                   b"]", b":", b"|", "²".encode(), b"9" * 40],
    "config": [b"tunnels:", b"proto:", b"addr:", b"heartbeat_interval:", b"web_addr:", b"basic_auth:",
               b"proxy_proto:", b"schemes:", b"bind_tls:", b"!!binary", b"!!int", b"!!float", b"!!timestamp",
               b"!!bool", b"!!python/object", b"&a", b"*a", b"? ", b"<<:", b"[[[[", b"{{", b".nan", b".inf",
               b"1e400", b"9" * 20, b"\xef\xbb\xbf", b"\xff", b"%YAML 1.1\n---\n", b"\t", "²".encode()],
}


# ---------------------------------------------------------------------------------------------
# Engines


def write_seeds(target: object, seed_dir: Path) -> None:
    seed_dir.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(target.seeds()):  # type: ignore[attr-defined]
        (seed_dir / f"seed-{i:03d}").write_bytes(s)


def child_atheris(name: str, runs: int, workdir: Path, timeout: int) -> None:
    """Run one target under atheris; never returns (libFuzzer exits)."""
    import atheris

    with atheris.instrument_imports(include=["tunneld", "yaml", "json"]):
        target = make_target(name)
    base = workdir / name
    corpus, seeds, artifacts = base / "corpus", base / "seeds", base / "artifacts"
    for d in (corpus, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    write_seeds(target, seeds)
    dict_file = base / "dict"
    lines = ('"' + "".join(f"\\x{b:02x}" for b in tok) + '"\n' for tok in DICTIONARY[name])
    dict_file.write_text("".join(lines))

    def one(data: bytes) -> None:
        target.check(data)

    argv = [sys.argv[0], str(corpus), str(seeds), f"-runs={runs}", f"-timeout={timeout}",
            f"-max_len={target.max_len}", "-rss_limit_mb=2048", f"-artifact_prefix={artifacts}/",
            f"-dict={dict_file}", "-print_final_stats=1", "-print_pcs=0", "-reduce_inputs=1"]
    atheris.Setup(argv, one)
    atheris.Fuzz()


MUTATORS = 9
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 0xFFFFFF, 0x4000, 0x4001]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes], tokens: list[bytes], max_len: int) -> bytes:
    buf = bytearray(data)
    for _ in range(1 + int(rng.expovariate(0.7))):
        op = rng.randrange(MUTATORS)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.choice((1, 1, 2, 4, 8, 32)))
        elif op == 3 and buf:
            del buf[pos : pos + rng.choice((1, 1, 2, 4, 16, 256))]
        elif op == 4 and buf:
            a = rng.randrange(len(buf))
            piece = buf[a : a + rng.randint(1, 64)]
            buf[pos:pos] = piece * rng.choice((1, 1, 2, 16))
        elif op == 5:
            other = rng.choice(corpus)
            a = rng.randrange(len(other) + 1)
            buf[pos:] = other[a:] if rng.random() < 0.5 else other[a : a + rng.randint(1, 128)] + buf[pos:]
        elif op == 6 and len(buf) >= pos + 4:
            v = rng.choice(INTERESTING) + rng.choice((0, 0, -1, 1))
            fmt = rng.choice(("!B", "!H", "!I", "<I", "<q"))
            size = struct.calcsize(fmt)
            if pos + size <= len(buf):
                lim = 1 << (8 * size)
                struct.pack_into(fmt.replace("q", "Q"), buf, pos, v % lim)
        elif op == 7 and tokens:
            buf[pos:pos] = rng.choice(tokens)
        elif op == 8:
            del buf[pos:]
    return bytes(buf[:max_len])


def outcome_key(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    return type(exc).__name__ + ":" + re.sub(r"[0-9]+|'.*?'|\".*?\"", "#", str(exc))[:48]


def run_mutate(name: str, runs: int, seed: int, timeout: float, workdir: Path) -> dict[str, object]:
    target = make_target(name)
    from tunneld.core._errors import ConfigError, ProtocolError

    rng = random.Random(seed)
    corpus = list(target.seeds())
    seen: set[str] = set()
    tokens = DICTIONARY[name]
    crashes = hangs = 0
    artifacts = workdir / name / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)

    def alarm(_sig: int, _frame: object) -> None:
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    start = time.monotonic()
    for i in range(runs):
        if i < len(corpus):
            data = corpus[i]
        else:
            data = mutate(rng, rng.choice(corpus), corpus, tokens, target.max_len)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            target.check(data)
            key = "ok"
        except (ProtocolError, ConfigError) as exc:  # never expected: checks catch the allowed ones
            key = outcome_key(exc)
            crashes += 1
            (artifacts / f"crash-{i}").write_bytes(data)
            print(f"[{name}] FINDING #{i}: {exc!r} input={data[:200].hex()}", flush=True)
        except Hang:
            hangs += 1
            key = "hang"
            (artifacts / f"timeout-{i}").write_bytes(data)
            print(f"[{name}] HANG #{i}: input={data[:200].hex()}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a finding, recorded and counted
            key = outcome_key(exc)
            crashes += 1
            (artifacts / f"crash-{i}").write_bytes(data)
            print(f"[{name}] FINDING #{i}: {exc!r:.300} input={data[:200].hex()}", flush=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if key not in seen and len(corpus) < 20000:
            seen.add(key)
            corpus.append(data)
        elif rng.random() < 0.0005 and len(corpus) < 20000:
            corpus.append(data)  # a little diversity beyond outcome classes
        if i and i % 100000 == 0:
            print(f"[{name}] {i} inputs, {time.monotonic() - start:.0f}s, corpus {len(corpus)}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"target": name, "engine": "mutate", "runs": runs, "corpus": len(corpus), "crashes": crashes,
            "hangs": hangs, "peak_rss_mb": rss / 1024, "seconds": time.monotonic() - start}


def run_atheris_parent(
    name: str, runs: int, workdir: Path, timeout: int, log: Path | None
) -> dict[str, object]:
    """Run the atheris child for ``name``; collect counts from its output and rusage."""
    cmd = [sys.executable, __file__, "--target", name, "--runs", str(runs), "--engine", "atheris",
           "--workdir", str(workdir), "--timeout", str(timeout), "--child"]
    start = time.monotonic()
    out_path = log or (workdir / f"{name}.log")
    workdir.mkdir(parents=True, exist_ok=True)
    with open(out_path, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = out_path.read_text(errors="replace")
    done = re.findall(r"Done (\d+) runs", text)
    corpus = workdir / name / "corpus"
    artifacts = workdir / name / "artifacts"
    arts = [p.name for p in artifacts.iterdir()] if artifacts.exists() else []
    return {"target": name, "engine": "atheris", "runs": int(done[-1]) if done else None,
            "exit": proc.returncode, "corpus": len(list(corpus.iterdir())) if corpus.exists() else 0,
            "crashes": sum(a.startswith("crash-") for a in arts),
            "hangs": sum(a.startswith("timeout-") for a in arts),
            "ooms": sum(a.startswith("oom-") for a in arts),
            "peak_rss_mb": usage.ru_maxrss / 1024, "seconds": time.monotonic() - start, "log": str(out_path)}


def replay(name: str, files: list[str]) -> None:
    target = make_target(name)
    for f in files:
        data = Path(f).read_bytes()
        t0 = time.perf_counter()
        target.check(data)
        print(f"{f}: ok in {time.perf_counter() - t0:.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=TARGETS, action="append", help="repeatable")
    parser.add_argument("--all", action="store_true", help="every target, one after the other")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    parser.add_argument("--timeout", type=int, default=1, help="per-input time limit (seconds)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunneld-fuzz"))
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs through --target")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.setrecursionlimit(1000)
    names = list(TARGETS) if args.all else (args.target or [])
    if not names:
        parser.error("give --target NAME or --all")
    if args.replay:
        replay(names[0], args.replay)
        return
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "mutate"
        else:
            engine = "atheris"
    if args.child:
        child_atheris(names[0], args.runs, args.workdir, args.timeout)
        return
    results = []
    for name in names:
        print(f"== {name}: {args.runs} inputs, engine {engine}", flush=True)
        if engine == "atheris":
            res = run_atheris_parent(name, args.runs, args.workdir, args.timeout, None)
        else:
            res = run_mutate(name, args.runs, args.seed, float(args.timeout), args.workdir)
        print(res, flush=True)
        results.append(res)
    print("\ntarget       engine   inputs    corpus  crashes hangs  peak RSS MB  seconds")
    for r in results:
        print(f"{r['target']:<12} {r['engine']:<8} {r['runs']!s:<9} {r['corpus']!s:<7} {r['crashes']!s:<8}"
              f"{r['hangs']!s:<6} {r['peak_rss_mb']:<12.1f} {r['seconds']:.0f}")
    bad = [r for r in results if r["crashes"] or r["hangs"] or r.get("ooms") or r["runs"] != args.runs]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
