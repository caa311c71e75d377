"""Throughput of BulkTLSStream vs trio.SSLStream on loopback (not a test).

    python bench/tls_stream.py [--size-mib 1024] [--chunk-kib 256] [--runs 3]

The sender writes SIZE bytes in CHUNK pieces, the receiver reads with receive_some() (its default
max_bytes: 256 KiB for BulkTLSStream, trio's 64 KiB-ish default for SSLStream is overridden to the
same 256 KiB) and answers b"k" once everything arrived; the time until that ack is the measurement.
Two setups:

* ``2proc``: receiver in a child process (encrypt and decrypt on different cores, like edge/agent);
* ``1proc``: both ends in one trio run (one core does both).

MB/s are 10**6 bytes per second; each figure is the median of --runs runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
import trustme
from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunneld.core._tls import BulkTLSStream, client_context, server_context  # noqa: E402

RECV = 256 * 1024


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.chain = tmp / "chain.pem"
        self.chain.write_bytes(b"".join(b.bytes() for b in self.cert.cert_chain_pems))
        self.key = tmp / "key.pem"
        self.cert.private_key_pem.write_to_path(str(self.key))
        self.ca_pem = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))

    def wrap(self, impl: str, tcp: trio.SocketStream, server_side: bool) -> trio.abc.Stream:
        if impl == "bulk":
            if server_side:
                return BulkTLSStream(tcp, server_context(self.chain, self.key), server_side=True)
            return BulkTLSStream(
                tcp, client_context(self.ca_pem), server_side=False, server_hostname="127.0.0.1"
            )
        if impl == "sslstream":
            if server_side:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.load_cert_chain(str(self.chain), str(self.key))
                return trio.SSLStream(tcp, ctx, server_side=True)
            ctx = ssl.create_default_context(cafile=str(self.ca_pem))
            return trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
        if impl == "plain":
            return tcp
        raise ValueError(impl)


async def receiver(stream: trio.abc.Stream, size: int) -> tuple[int, int]:
    got = calls = 0
    while got < size:
        data = await stream.receive_some(RECV)
        if not data:
            raise RuntimeError(f"EOF after {got} bytes")
        got += len(data)
        calls += 1
    await stream.send_all(b"k")
    return got, calls


async def sender(stream: trio.abc.Stream, size: int, chunk: int) -> float:
    block = os.urandom(chunk)
    t0 = time.perf_counter()
    sent = 0
    while sent < size:
        n = min(chunk, size - sent)
        await stream.send_all(block if n == chunk else block[:n])
        sent += n
    ack = await stream.receive_some(16)
    assert ack == b"k", ack
    return time.perf_counter() - t0


async def _handshake(stream: trio.abc.Stream) -> None:
    await stream.do_handshake()  # type: ignore[attr-defined]


def _child(pki_dir: str, impl: str, size: int, conn: multiprocessing.connection.Connection) -> None:
    pki = Pki.__new__(Pki)
    pki.chain, pki.key, pki.ca_pem = (Path(pki_dir) / n for n in ("chain.pem", "key.pem", "ca.pem"))

    async def main() -> None:
        (lst,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        conn.send(lst.socket.getsockname()[1])
        tcp = await lst.accept()
        stream = pki.wrap(impl, tcp, server_side=True)
        got, calls = await receiver(stream, size)
        conn.send((got, calls))
        await trio.sleep(0.2)
        await trio.aclose_forcefully(stream)

    trio.run(main)


def run_2proc(pki: Pki, pki_dir: str, impl: str, size: int, chunk: int) -> tuple[float, float]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(pki_dir, impl, size, child))
    proc.start()
    port = parent.recv()

    async def main() -> float:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = pki.wrap(impl, tcp, server_side=False)
        if impl != "plain":
            await _handshake(stream)
        secs = await sender(stream, size, chunk)
        await trio.aclose_forcefully(stream)
        return secs

    secs = trio.run(main)
    got, calls = parent.recv()
    proc.join()
    return secs, got / calls


def run_1proc(pki: Pki, impl: str, size: int, chunk: int) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        (lst,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        ctcp = await trio.open_tcp_stream("127.0.0.1", lst.socket.getsockname()[1])
        stcp = await lst.accept()
        client = pki.wrap(impl, ctcp, server_side=False)
        server = pki.wrap(impl, stcp, server_side=True)
        if impl != "plain":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handshake, client)
                nursery.start_soon(_handshake, server)
        result: dict[str, object] = {}

        async def recv() -> None:
            result["r"] = await receiver(server, size)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(recv)
            secs = await sender(client, size, chunk)
        got, calls = result["r"]  # type: ignore[misc]
        for s in (client, server):
            await trio.aclose_forcefully(s)
        await lst.aclose()
        return secs, got / calls

    return trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-kib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--impls", default="bulk,sslstream,plain")
    ap.add_argument("--modes", default="2proc,1proc")
    args = ap.parse_args()
    size = args.size_mib * 1024 * 1024
    chunk = args.chunk_kib * 1024
    with tempfile.TemporaryDirectory() as tmp:
        pki = Pki(Path(tmp))
        print(
            f"{args.size_mib} MiB per run, send chunk {args.chunk_kib} KiB, "
            f"receive_some({RECV // 1024} KiB), median of {args.runs}; "
            f"bulk: pyOpenSSL on {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}, "
            f"sslstream: stdlib on {ssl.OPENSSL_VERSION}"
        )
        print(f"{'mode':6} {'impl':10} {'MB/s':>8}  {'runs MB/s':30} avg receive_some")
        for mode in args.modes.split(","):
            for impl in args.impls.split(","):
                rates = []
                avg = 0.0
                for _ in range(args.runs):
                    if mode == "2proc":
                        secs, avg = run_2proc(pki, tmp, impl, size, chunk)
                    else:
                        secs, avg = run_1proc(pki, impl, size, chunk)
                    rates.append(size / secs / 1e6)
                runs = ", ".join(f"{r:.0f}" for r in rates)
                print(
                    f"{mode:6} {impl:10} {statistics.median(rates):8.0f}  {runs:30} "
                    f"{avg / 1024:.1f} KiB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
