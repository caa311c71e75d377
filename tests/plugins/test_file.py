"""The file server: ``tunneld http file:///…`` through a real edge and agent, and its pure parts.

End-to-end tests share one layout (``share`` below, ``outside`` beside it holding a secret),
reached through the edge's public HTTP port with the tunnel's Host header.  Escape attempts
are sent as raw bytes (curl and httpx would normalise ``..`` away before sending).
"""

from __future__ import annotations

import errno
import hashlib
import html
import os
import random
import re
import subprocess
import sys
from email.utils import formatdate
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import quote

import attrs
import pytest
import trio
import trio.testing
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunneld.cli import cli
from tunneld.core import Agent, AgentConfig, TunnelConfig
from tunneld.core._plugins import build_registry, get_plugin_manager
from tunneld.plugins.file import _reading, _server
from tunneld.plugins.file._http import content_type, decide, etag_for
from tunneld.plugins.file._paths import contain, split_target, url_path
from tunneld.plugins.file._ranges import ByteRange, RangeNotSatisfiable, parse_range
from tunneld.plugins.file._server import FileServer
from tunneld.plugins.file._url import parse_file_url

from ..conftest import EdgeEnv
from .test_http import RawClient, curl, host_of, httpx_client

MiB = 1024 * 1024
SECRET = b"TOP SECRET: never served"
#: Names with characters that must be escaped in HTML and quoted in URLs.
ODD_NAMES = ['<b>&"x\'.txt', "a b#c?.txt", "a:b.txt", "ünï.txt"]


# --------------------------------------------------------------------------------------------
# The served tree
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Tree:
    root: Path
    outside: Path
    big: bytes


def make_tree(base: Path) -> Tree:
    outside = base / "outside"
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    root = base / "share"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    (root / "empty.txt").write_bytes(b"")
    big = random.Random(4).randbytes(3 * MiB + 12345)
    (root / "big.bin").write_bytes(big)
    (root / "page.html").write_text("<p>page</p>")
    (root / "archive.tar.gz").write_bytes(b"\x1f\x8b not really")
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_text("inner\n")
    (root / "site").mkdir()
    (root / "site" / "index.html").write_text("<h1>site</h1>")
    (root / "site" / "other.txt").write_text("other\n")
    for name in ODD_NAMES:
        (root / name).write_text(f"odd {name}\n")
    (root / ".hidden").write_text("hidden\n")
    (root / "back\\slash.txt").write_text("never served, so never listed\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "Zeta.txt").write_text("z\n")
    os.symlink("sub", root / "link-in")
    os.symlink("hello.txt", root / "link-file-in")
    os.symlink("../outside", root / "link-out")
    os.symlink(str(outside / "secret.txt"), root / "link-out-file")
    os.symlink("missing", root / "dangling")
    os.mkfifo(root / "fifo")
    return Tree(root, outside, big)


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return make_tree(tmp_path / "files")


@attrs.frozen
class Served:
    env: EdgeEnv
    agent: Agent
    host: str
    tree: Tree

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.env.http_port}"

    async def raw(self) -> RawClient:
        return await RawClient.connect(self.env.http_port)

    async def get(self, path: str, *headers: tuple[str, str], method: str = "GET",
                  version: str = "1.1") -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh raw connection: (status, lower-cased headers, body)."""
        client = await self.raw()
        try:
            resp = await client.request(method, path, self.host, headers=list(headers), version=version)
        finally:
            await client.aclose()
        return resp.status, {k.lower(): v for k, v in resp.headers}, resp.body


async def serve_tree(env: EdgeEnv, tree: Tree, addr: str | None = None) -> Served:
    agent = await env.start_agent(TunnelConfig(name="files", proto="http", addr=addr or tree.root.as_uri()))
    return Served(env, agent, host_of(agent), tree)


@pytest.fixture
async def served(edge_env: EdgeEnv, tree: Tree) -> Served:
    return await serve_tree(edge_env, tree)


# --------------------------------------------------------------------------------------------
# End to end: files, listings, redirects
# --------------------------------------------------------------------------------------------


async def test_curl_and_httpx_get_files(served: Served) -> None:
    with trio.fail_after(20):
        status, body = await curl("-H", f"Host: {served.host}", f"{served.base}/hello.txt")
        assert (status, body) == (200, b"hello\n")
        async with httpx_client() as client:
            resp = await client.get(f"{served.base}/big.bin", headers={"Host": served.host})
            assert resp.status_code == 200
            assert resp.content == served.tree.big
            assert resp.headers["content-type"] == "application/octet-stream"
            assert resp.headers["content-length"] == str(len(served.tree.big))
            assert resp.headers["accept-ranges"] == "bytes"
            assert resp.headers["x-content-type-options"] == "nosniff"
            resp = await client.get(f"{served.base}/{quote('a b#c?.txt')}", headers={"Host": served.host})
            assert (resp.status_code, resp.text) == (200, "odd a b#c?.txt\n")
        # over HTTPS too, with the URL the agent reports
        port = served.env.https_port
        url = f"{served.agent.tunnels[0].public_url}/sub/inner.txt"
        resolve = f"{served.host}:{port}:127.0.0.1"
        status, body = await curl("--cacert", str(served.env.ca), "--resolve", resolve, url)
        assert (status, body) == (200, b"inner\n")


async def test_content_types(served: Served) -> None:
    with trio.fail_after(20):
        expected = {"/hello.txt": "text/plain; charset=utf-8", "/page.html": "text/html; charset=utf-8",
                    "/archive.tar.gz": "application/gzip", "/big.bin": "application/octet-stream"}
        for path, ctype in expected.items():
            status, headers, _ = await served.get(path, method="HEAD")
            assert (status, headers["content-type"]) == (200, ctype), path


async def test_head_has_get_headers_and_no_body(served: Served) -> None:
    with trio.fail_after(20):
        client = await served.raw()
        head = await client.request("HEAD", "/big.bin", served.host)
        get = await client.request("GET", "/big.bin", served.host)  # same connection: HEAD sent no body
        await client.aclose()
        assert head.status == get.status == 200
        assert head.body == b""
        assert get.body == served.tree.big
        for name in ("content-length", "content-type", "etag", "last-modified"):
            assert head.header(name) == get.header(name)
        status, _, body = await served.get("/", method="HEAD")
        assert (status, body) == (200, b"")


async def test_directory_listing(served: Served) -> None:
    with trio.fail_after(20):
        status, headers, body = await served.get("/")
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src" not in headers["content-security-policy"]  # default-src 'none' covers it
        page = body.decode()
        hrefs = re.findall(r'<a href="([^"]*)">', page)
        texts = re.findall(r'<a href="[^"]*">([^<]*)</a>', page)
        # hidden files, names with a backslash, FIFOs, dangling links and links leading out are
        # not listed
        assert [html.unescape(t) for t in texts] == sorted(
            ["archive.tar.gz", "big.bin", "empty.txt", "hello.txt", "link-file-in", "link-in/",
             "page.html", "site/", "sub/", "Zeta.txt", *ODD_NAMES], key=lambda n: (n.casefold(), n))
        for name in ODD_NAMES:
            assert html.escape(name) in page
            assert f'href="{html.escape(quote(name.encode(), safe=""))}"' in page
        assert '<b>&"x' not in page
        assert "a%3Ab.txt" in hrefs  # a relative href "a:b.txt" would be a URL scheme
        # every link works
        for href in hrefs:
            status, _, _ = await served.get("/" + html.unescape(href), method="HEAD")
            assert status == 200, href
        # a subdirectory lists its parent
        status, _, body = await served.get("/sub/")
        assert status == 200
        assert b'href="../"' in body and b'href="inner.txt"' in body
        assert b"Index of /sub/" in body


async def test_directory_redirect_and_index(served: Served) -> None:
    with trio.fail_after(20):
        status, headers, _ = await served.get("/sub")
        assert (status, headers["location"]) == (301, "/sub/")
        status, headers, _ = await served.get("/sub?x=1")
        assert (status, headers["location"]) == (301, "/sub/?x=1")
        # the Location is rebuilt from the path, so "//host" cannot become a protocol-relative URL
        status, headers, _ = await served.get("//sub")
        assert (status, headers["location"]) == (301, "/sub/")
        status, _, body = await served.get("/site/")
        assert (status, body) == (200, b"<h1>site</h1>")
        status, _, body = await served.get("/site/other.txt")
        assert (status, body) == (200, b"other\n")
        # curl follows the redirect
        status, body = await curl("-L", "-H", f"Host: {served.host}", f"{served.base}/site")
        assert (status, body) == (200, b"<h1>site</h1>")
        # a file is not a directory
        status, _, _ = await served.get("/hello.txt/")
        assert status == 404


async def test_symlinks_inside_the_root_are_served(served: Served) -> None:
    with trio.fail_after(20):
        assert (await served.get("/link-in/inner.txt"))[2] == b"inner\n"
        assert (await served.get("/link-file-in"))[2] == b"hello\n"


# --------------------------------------------------------------------------------------------
# End to end: ranges and validators
# --------------------------------------------------------------------------------------------


async def test_ranges(served: Served) -> None:
    big = served.tree.big
    size = len(big)
    with trio.fail_after(20):
        for spec, (start, end) in {"bytes=0-9": (0, 9), "bytes=-10": (size - 10, size - 1),
                                   f"bytes={size - 5}-": (size - 5, size - 1),
                                   "bytes=1000-2999999": (1000, 2999999),
                                   f"bytes=10-{size * 2}": (10, size - 1)}.items():
            status, headers, body = await served.get("/big.bin", ("Range", spec))
            assert status == 206, spec
            assert headers["content-range"] == f"bytes {start}-{end}/{size}"
            assert body == big[start:end + 1]
        # several ranges: the whole file
        status, headers, body = await served.get("/big.bin", ("Range", "bytes=0-1,5-6"))
        assert (status, body == big) == (200, True)
        assert "content-range" not in headers
        # invalid: ignored
        status, _, body = await served.get("/hello.txt", ("Range", "bytes=5-1"))
        assert (status, body) == (200, b"hello\n")
        for spec in (f"bytes={size}-", "bytes=-0"):
            status, headers, body = await served.get("/big.bin", ("Range", spec))
            assert (status, headers["content-range"], body) == (416, f"bytes */{size}", b"")
        status, headers, _ = await served.get("/empty.txt", ("Range", "bytes=0-"))
        assert (status, headers["content-range"]) == (416, "bytes */0")
        # curl's own range option
        status, body = await curl("-r", "100-199", "-H", f"Host: {served.host}", f"{served.base}/big.bin")
        assert (status, body) == (206, big[100:200])


async def test_if_range(served: Served) -> None:
    with trio.fail_after(20):
        _, headers, _ = await served.get("/hello.txt", method="HEAD")
        etag, modified = headers["etag"], headers["last-modified"]
        for validator in (etag, modified):
            status, _, body = await served.get("/hello.txt", ("Range", "bytes=1-2"), ("If-Range", validator))
            assert (status, body) == (206, b"el")
        for stale in ('"0-0"', "W/" + etag, "Thu, 01 Jan 1998 00:00:00 GMT"):
            status, _, body = await served.get("/hello.txt", ("Range", "bytes=1-2"), ("If-Range", stale))
            assert (status, body) == (200, b"hello\n")


async def test_conditional_requests(served: Served) -> None:
    path = served.tree.root / "hello.txt"
    with trio.fail_after(20):
        status, headers, _ = await served.get("/hello.txt")
        etag, modified = headers["etag"], headers["last-modified"]
        assert status == 200 and etag.startswith('"')
        for inm in (etag, f'"other", {etag}', "W/" + etag, "*"):
            status, headers304, body = await served.get("/hello.txt", ("If-None-Match", inm))
            assert (status, body) == (304, b""), inm
            assert headers304["etag"] == etag and "content-length" not in headers304
        assert (await served.get("/hello.txt", ("If-None-Match", '"nope"')))[0] == 200
        assert (await served.get("/hello.txt", ("If-Modified-Since", modified)))[0] == 304
        later = formatdate(path.stat().st_mtime + 3600, usegmt=True)
        assert (await served.get("/hello.txt", ("If-Modified-Since", later)))[0] == 304
        earlier = formatdate(path.stat().st_mtime - 3600, usegmt=True)
        assert (await served.get("/hello.txt", ("If-Modified-Since", earlier)))[0] == 200
        assert (await served.get("/hello.txt", ("If-Modified-Since", "garbage")))[0] == 200
        # If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2)
        status, _, _ = await served.get("/hello.txt", ("If-None-Match", '"nope"'),
                                        ("If-Modified-Since", modified))
        assert status == 200
        # a change gives a new validator
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
        status, headers, _ = await served.get("/hello.txt", ("If-None-Match", etag))
        assert status == 200 and headers["etag"] != etag
        # httpx sees the 304 too
        async with httpx_client() as client:
            resp = await client.get(f"{served.base}/hello.txt",
                                    headers={"Host": served.host, "If-None-Match": headers["etag"]})
            assert resp.status_code == 304


# --------------------------------------------------------------------------------------------
# End to end: the connection (methods, keep-alive, bodies, HTTP/1.0)
# --------------------------------------------------------------------------------------------


async def test_other_methods_are_405_with_allow(served: Served) -> None:
    with trio.fail_after(20):
        client = await served.raw()
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND"):
            resp = await client.request(method, "/hello.txt", served.host, body=b"x" * 1000)
            assert resp.status == 405, method
            assert resp.header("allow") == "GET, HEAD"
        # the bodies were read and dropped: the connection still works
        resp = await client.request("GET", "/hello.txt", served.host)
        assert (resp.status, resp.body) == (200, b"hello\n")
        await client.aclose()
        assert (served.tree.root / "hello.txt").read_text() == "hello\n"  # PUT changed nothing


async def test_keep_alive_and_pipelining(served: Served) -> None:
    with trio.fail_after(20):
        client = await served.raw()
        paths = ["/hello.txt", "/sub/inner.txt", "/missing", "/", "/sub", "/big.bin"]
        # pipelined: all heads at once, answers in order on one connection
        await client.send(b"".join(f"GET {p} HTTP/1.1\r\nHost: {served.host}\r\n\r\n".encode()
                                   for p in paths))
        statuses = [(await client.read_response()).status for _ in paths]
        assert statuses == [200, 200, 404, 200, 301, 200]
        resp = await client.request("GET", "/hello.txt", served.host, headers=[("Connection", "close")])
        assert resp.status == 200
        assert await client.at_eof()
        await client.aclose()


async def test_http10(served: Served) -> None:
    with trio.fail_after(20):
        client = await served.raw()
        resp = await client.request("GET", "/hello.txt", served.host, version="1.0",
                                    headers=[("Connection", "keep-alive")])
        assert (resp.status, resp.body, resp.header("connection")) == (200, b"hello\n", "keep-alive")
        resp = await client.request("GET", "/sub/inner.txt", served.host, version="1.0")
        assert (resp.status, resp.body) == (200, b"inner\n")
        assert await client.at_eof()  # HTTP/1.0 without keep-alive: closed after the answer
        await client.aclose()
        status, body = await curl("--http1.0", "-H", f"Host: {served.host}", f"{served.base}/hello.txt")
        assert (status, body) == (200, b"hello\n")


@pytest.mark.parametrize("mode", ["page cache", "uncached", "no RWF_NOWAIT"])
async def test_large_file_is_streamed_in_chunks(served: Served, monkeypatch: pytest.MonkeyPatch,
                                                mode: str) -> None:
    """Never more than one 256 KiB chunk is read at a time, on the inline path or in threads."""
    inline: list[int] = []
    threaded: list[int] = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, n: int, offset: int) -> bytes:
        threaded.append(n)
        return real_pread(fd, n, offset)

    def preadv(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        if mode == "uncached":
            raise BlockingIOError(errno.EAGAIN, "not in the page cache")
        inline.append(sum(len(b) for b in buffers))
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    if mode == "no RWF_NOWAIT":
        monkeypatch.setattr(_reading, "_NOWAIT", 0)
    with trio.fail_after(30):
        async with httpx_client() as client:
            async with client.stream("GET", f"{served.base}/big.bin", headers={"Host": served.host}) as resp:
                digest = hashlib.sha256()
                async for chunk in resp.aiter_bytes():
                    digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(served.tree.big).hexdigest()
    reads = inline + threaded
    assert len(reads) >= len(served.tree.big) // (256 * 1024)
    assert max(reads) <= 256 * 1024
    # the page cache is read inline; misses and systems without RWF_NOWAIT use threads
    assert (bool(inline), bool(threaded)) == {"page cache": (True, False), "uncached": (False, True),
                                              "no RWF_NOWAIT": (False, True)}[mode]


async def test_reader_stops_asking_a_filesystem_without_nowait(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")
    calls: list[int] = []

    def preadv(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        calls.append(offset)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "preadv", preadv)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        reader = _reading.FileReader(fd)
        assert [await reader.read(0, 4), await reader.read(4, 4), await reader.read(8, 4)] == [
            b"0123", b"4567", b"89"]
        assert await reader.read(10, 4) == b""
    finally:
        os.close(fd)
    assert calls == ([0] if _reading._NOWAIT else [])


async def test_metrics_count_requests(served: Served) -> None:
    with trio.fail_after(20):
        for _ in range(3):
            assert (await served.get("/hello.txt"))[0] == 200
        counts = [t.metrics.http_count for t in served.agent.tunnels]
        assert sum(counts) == 3


# --------------------------------------------------------------------------------------------
# End to end: nothing outside the root
# --------------------------------------------------------------------------------------------

ESCAPES = [
    "/../outside/secret.txt",
    "/sub/../../outside/secret.txt",
    "/%2e%2e/outside/secret.txt",
    "/%2E%2E/outside/secret.txt",
    "/.%2e/outside/secret.txt",
    "/sub/%2e%2e%2f%2e%2e%2foutside%2fsecret.txt",
    "/..%2foutside%2fsecret.txt",
    "/%2e%2e%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/..\\outside\\secret.txt",
    "/sub\\..\\..\\outside\\secret.txt",
    "/%5c..%5coutside%5csecret.txt",
    "/hello.txt%00.html",
    "/hello.txt%00",
    "/link-out/secret.txt",
    "/link-out/",
    "/link-out-file",
    "/dangling",
    "/fifo",
    "/.hidden",
    "/.git/config",
    "/%2egit/config",
    "/sub/%2e%2e/.hidden",
    "/%252e%252e/outside/secret.txt",  # double-encoded: a literal "%2e%2e" name, absent
    "/%zz",
    "/" + "../" * 20 + "etc/passwd",
    "//../outside/secret.txt",
]
#: Targets not in origin form.
ABSOLUTE = [
    "http://{host}/../outside/secret.txt",
    "http://{host}/%2e%2e/outside/secret.txt",
    "file:///etc/passwd",
    "file://{outside}/secret.txt",
    "outside/secret.txt",
    "..%2foutside%2fsecret.txt",
    "*",
]


@pytest.mark.parametrize("target", ESCAPES + ABSOLUTE)
async def test_nothing_outside_the_root(served: Served, target: str) -> None:
    target = target.format(host=served.host, outside=served.tree.outside)
    with trio.fail_after(20):
        client = await served.raw()
        await client.send(f"GET {target} HTTP/1.1\r\nHost: {served.host}\r\n\r\n".encode())
        resp = await client.read_response()
        await client.aclose()
    assert resp.status in (400, 403, 404), (target, resp.status)
    assert SECRET not in resp.body
    assert b"root:" not in resp.body


async def test_absolute_form_inside_the_root_is_served(served: Served) -> None:
    # RFC 9112 §3.2.2: a server accepts absolute-form; only its path counts
    with trio.fail_after(20):
        client = await served.raw()
        target = f"http://{served.host}/hello.txt"
        await client.send(f"GET {target} HTTP/1.1\r\nHost: {served.host}\r\n\r\n".encode())
        resp = await client.read_response()
        await client.aclose()
    assert (resp.status, resp.body) == (200, b"hello\n")


# --------------------------------------------------------------------------------------------
# End to end: one file, start-up errors, the command line, basic auth
# --------------------------------------------------------------------------------------------


async def test_single_file(edge_env: EdgeEnv, tree: Tree) -> None:
    served = await serve_tree(edge_env, tree, (tree.root / "hello.txt").as_uri())
    assert served.agent.tunnels[0].upstream == (tree.root / "hello.txt").as_uri()
    with trio.fail_after(20):
        assert (await served.get("/"))[:3:2] == (200, b"hello\n")
        assert (await served.get("/hello.txt"))[:3:2] == (200, b"hello\n")
        for path in ("/big.bin", "/hello.txt/", "/../outside/secret.txt", "/other"):
            assert (await served.get(path))[0] == 404, path


async def test_root_through_a_symlink(edge_env: EdgeEnv, tree: Tree) -> None:
    # The root itself may be reached through a symlink: it is resolved once, at start.
    alias = tree.root.parent / "alias"
    os.symlink(tree.root, alias)
    served = await serve_tree(edge_env, tree, alias.as_uri())
    with trio.fail_after(20):
        assert (await served.get("/hello.txt"))[2] == b"hello\n"
        assert (await served.get("/link-out/secret.txt"))[0] == 404


def test_missing_path_fails_at_start(tmp_path: Path) -> None:
    config = AgentConfig(authtoken="x", web_addr=None)
    with pytest.raises(ValueError, match=f"cannot serve {tmp_path / 'nope'}: No such file or directory"):
        Agent(config, [TunnelConfig(name="f", proto="http", addr=(tmp_path / "nope").as_uri())])


def test_cli_refuses_relative_and_missing_paths(tmp_path: Path) -> None:
    runner = CliRunner()
    for addr in ("file://relative", "file://./x", "file:relative", "file:", "file:///C:relative"):
        result = runner.invoke(cli, ["http", addr, "--authtoken", "x"])
        assert result.exit_code == 2, (addr, result.output)
        assert "Invalid value for ADDR" in result.output and "relative" in result.output, result.output
    result = runner.invoke(cli, ["http", (tmp_path / "nope").as_uri(), "--authtoken", "x"])
    assert result.exit_code == 2
    assert "No such file or directory" in result.output


async def test_basic_auth_at_the_edge(edge_env: EdgeEnv, tree: Tree) -> None:
    credential = "alice:long enough"
    agent = await edge_env.start_agent(TunnelConfig(name="files", proto="http", addr=tree.root.as_uri(),
                                                    basic_auth=[credential]))
    served = Served(edge_env, agent, host_of(agent), tree)
    with trio.fail_after(20):
        status, headers, body = await served.get("/hello.txt")
        assert status == 401 and "www-authenticate" in headers and body != b"hello\n"
        status, body = await curl("-u", credential, "-H", f"Host: {served.host}", f"{served.base}/hello.txt")
        assert (status, body) == (200, b"hello\n")
        status, _ = await curl("-u", "alice:wrong password", "-H", f"Host: {served.host}", f"{served.base}/")
        assert status == 401
        async with httpx_client(auth=("alice", "long enough")) as client:
            resp = await client.get(f"{served.base}/sub/inner.txt", headers={"Host": served.host})
            assert (resp.status_code, resp.content) == (200, b"inner\n")


# --------------------------------------------------------------------------------------------
# The plugin wiring
# --------------------------------------------------------------------------------------------


def test_http_tunnels_delegate_file_urls_through_the_hook(tmp_path: Path) -> None:
    http = build_registry(get_plugin_manager(entry_points=False))["http"]
    assert http.parse_addr(tmp_path.as_uri()) == tmp_path.as_uri()
    assert http.parse_addr(f" file://localhost{tmp_path}/ ") == tmp_path.as_uri()
    assert http.parse_addr("8080") == "http://localhost:8080"  # other addresses are http's
    # Without the file plugin nobody claims file: URLs, and http refuses them itself.
    pm = get_plugin_manager(entry_points=False, blocked=["tunneld.plugins.file"])
    with pytest.raises(ValueError, match="unsupported scheme 'file'"):
        build_registry(pm)["http"].parse_addr(tmp_path.as_uri())


def test_http_plugin_does_not_import_the_file_plugin() -> None:
    code = ("import sys, tunneld.plugins.http, tunneld.plugins.tcp; "
            "assert 'tunneld.plugins.file' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# Units: file: URLs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("file:///srv/share", PurePosixPath("/srv/share")),
    ("file:///srv/share/", PurePosixPath("/srv/share")),
    ("FILE:///srv//a/./b", PurePosixPath("/srv/a/b")),
    ("file://localhost/srv", PurePosixPath("/srv")),
    ("file://LocalHost/srv", PurePosixPath("/srv")),
    ("file:/srv", PurePosixPath("/srv")),
    ("file:///", PurePosixPath("/")),
    ("  file:///srv  ", PurePosixPath("/srv")),
    ("file:///srv/Public%20Folder", PurePosixPath("/srv/Public Folder")),
    ("file:///srv/Public Folder", PurePosixPath("/srv/Public Folder")),
    ("file:///srv/a#b?c", PurePosixPath("/srv/a#b?c")),
    ("file:///srv/caf%C3%A9", PurePosixPath("/srv/café")),
    ("file:///C:\\Users\\alan\\Public Folder", PureWindowsPath("C:/Users/alan/Public Folder")),
    ("file:///C:/Users/alan", PureWindowsPath("C:\\Users\\alan")),
    ("file:///c:/", PureWindowsPath("c:\\")),
    ("file://C:/Users", PureWindowsPath("C:/Users")),
    ("file:C:\\x", PureWindowsPath("C:/x")),
    ("file://localhost/D:/data%20set", PureWindowsPath("D:/data set")),
])
def test_parse_file_url(url: str, expected: PurePosixPath | PureWindowsPath) -> None:
    path = parse_file_url(url)
    assert type(path) is type(expected)
    assert path == expected
    assert path.is_absolute()
    if isinstance(path, PureWindowsPath):
        assert path.drive.upper() == expected.drive.upper()


@pytest.mark.parametrize(("url", "message"), [
    ("file://relative", "host name or a relative path"),
    ("file://relative/x", "host name or a relative path"),
    ("file://./x", "host name or a relative path"),
    ("file://../x", "host name or a relative path"),
    ("file://example.com/srv", "host name or a relative path"),
    ("file:relative", "relative path"),
    ("file:./x", "relative path"),
    ("file:", "relative path"),
    ("file://", "relative path"),
    ("file:///C:relative", "relative Windows path"),
    ("file:C:", "relative Windows path"),
    ("file:///srv/%00x", "NUL"),
    ("http://localhost/srv", "not a file:// URL"),
])
def test_parse_file_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_file_url(url)


def test_server_from_url_checks_the_path(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    assert FileServer.from_url(tmp_path.as_uri()).is_dir
    assert not FileServer.from_url((tmp_path / "f").as_uri()).is_dir
    with pytest.raises(ValueError, match="No such file or directory"):
        FileServer.from_url((tmp_path / "missing").as_uri())
    with pytest.raises(ValueError, match="neither a directory nor a regular file"):
        FileServer.from_url((tmp_path / "pipe").as_uri())
    with pytest.raises(ValueError, match="Windows path"):
        FileServer.from_url("file:///C:/Users")


def test_unreadable_is_403(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # EACCES is simulated: these tests may run as root, who reads everything.
    (tmp_path / "locked.txt").write_text("x")
    (tmp_path / "closed").mkdir()
    real_open, real_scandir = os.open, os.scandir

    def deny_open(path: str, flags: int, *args: int) -> int:
        if str(path).endswith("locked.txt"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    def deny_scandir(path: str) -> object:
        if str(path).endswith("closed"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "open", deny_open)
    monkeypatch.setattr(os, "scandir", deny_scandir)
    server = FileServer.from_url(tmp_path.as_uri())
    assert server.lookup(b"/locked.txt") == _server.Refused(403, "forbidden")
    assert server.lookup(b"/closed/") == _server.Refused(403, "forbidden")
    assert isinstance(server.lookup(b"/"), _server.Page)


# --------------------------------------------------------------------------------------------
# Units: request targets and containment
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "expected"), [
    (b"/", ([], True)),
    (b"/a/b%20c/", (["a", "b c"], True)),
    (b"/a//b", (["a", "b"], False)),
    (b"/a/b?x=/../..#frag", (["a", "b"], False)),
    (b"/a%3Fb", (["a?b"], False)),
    (b"/caf%C3%A9", (["café"], False)),
    (b"/%FF", ([os.fsdecode(b"\xff")], False)),
    (b"http://h.example/x/y?z", (["x", "y"], False)),
    (b"HTTPS://h.example", ([], True)),
])
def test_split_target(target: bytes, expected: tuple[list[str], bool]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize("target", [
    b"/..", b"/a/..", b"/a/../b", b"/.", b"/%2e", b"/%2e%2E", b"/a/%2E%2e/b", b"/.%2e", b"/a%2fb", b"/a%2F..",
    b"/a%5cb", b"/a\\b", b"/%00", b"/a%00.txt", b"/a\x00", b"/%zz", b"/%2", b"/a%", b"/.hidden", b"/a/.git/x",
    b"a/b", b"*", b"file:///etc/passwd", b"//../x"[1:] + b"/..", b"/a\tb", b"/a\x7f",
])
def test_split_target_refuses(target: bytes) -> None:
    assert split_target(target) is None


def test_url_path_quotes_every_segment() -> None:
    assert url_path([], True) == "/"
    assert url_path(["a b", "c:d", "e?#"], True) == "/a%20b/c%3Ad/e%3F%23/"
    assert url_path(["x"], False) == "/x"
    assert url_path([os.fsdecode(b"\xff")], False) == "/%FF"


@pytest.fixture(scope="module")
def shared_tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return make_tree(tmp_path_factory.mktemp("shared"))


def test_contain(shared_tree: Tree) -> None:
    root = os.path.realpath(shared_tree.root)
    assert contain(root, []) == root
    assert contain(root, ["sub", "inner.txt"]) == os.path.join(root, "sub", "inner.txt")
    assert contain(root, ["link-in", "inner.txt"]) == os.path.join(root, "sub", "inner.txt")
    assert contain(root, ["link-out", "secret.txt"]) is None
    assert contain(root, ["link-out-file"]) is None
    assert contain(root, ["dangling"]) is None
    assert contain(root, ["missing"]) is None
    assert contain(root, [".."]) is None  # even if a caller skipped split_target
    assert contain(root, ["x" * 5000]) is None  # ENAMETOOLONG is "not there", not an error


#: Pieces of hostile and ordinary targets; hypothesis strings them together.
TARGET_PIECES = ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "%00", "%", "%25",
                 "%2", "?", "#", "sub", "link-in", "link-out", "link-out-file", "outside", "secret.txt",
                 "hello.txt", "fifo", "dangling", ".git", "config", "http://h", "file://", "%ff", "a b"]


def _check_found(server: FileServer, target: bytes) -> None:
    found = server.lookup(target)
    if isinstance(found, _server.Opened):
        try:
            opened = os.readlink(f"/proc/self/fd/{found.fd}")  # what was really opened
        finally:
            os.close(found.fd)
        assert Path(opened).is_relative_to(server.root), (target, opened)
        assert Path(opened).read_bytes() != SECRET
    elif isinstance(found, _server.Redirect):
        assert found.location.startswith("/") and not found.location.startswith("//")
    split = split_target(target)
    if split is not None:
        real = contain(server.root, split[0])
        assert real is None or Path(real).is_relative_to(server.root)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TARGET_PIECES), max_size=14).map("".join))
@example("/../outside/secret.txt")
@example("/link-out/secret.txt")
@example("/sub/%2e%2e/%2e%2e/outside/secret.txt")
def test_no_generated_target_escapes_the_root(shared_tree: Tree, target: str) -> None:
    _check_found(FileServer.from_url(shared_tree.root.as_uri()), target.encode("latin-1", "replace"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64))
def test_lookup_of_arbitrary_bytes(shared_tree: Tree, target: bytes) -> None:
    _check_found(FileServer.from_url(shared_tree.root.as_uri()), b"/" + target)
    _check_found(FileServer.from_url(shared_tree.root.as_uri()), target)


# --------------------------------------------------------------------------------------------
# Units: ranges, validators, content types
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "size", "expected"), [
    ("bytes=0-9", 100, ByteRange(0, 9)),
    ("bytes=90-", 100, ByteRange(90, 99)),
    ("bytes=-10", 100, ByteRange(90, 99)),
    ("bytes=-1000", 100, ByteRange(0, 99)),
    ("bytes=50-1000", 100, ByteRange(50, 99)),
    ("bytes=99-99", 100, ByteRange(99, 99)),
    ("Bytes = 1-2 ", 100, ByteRange(1, 2)),
    ("bytes=1-2,", 100, ByteRange(1, 2)),
    ("bytes=0-" + "9" * 5000, 100, ByteRange(0, 99)),  # longer than int() would convert
    ("bytes=-" + "9" * 40, 100, ByteRange(0, 99)),
    ("bytes=0-1,3-4", 100, None),
    ("bytes=5-1", 100, None),
    ("bytes=-", 100, None),
    ("bytes=a-b", 100, None),
    ("bytes=٣-٤", 100, None),  # Arabic-Indic digits are not ASCII digits
    ("bytes=+1-2", 100, None),
    ("items=0-1", 100, None),
    ("bytes 0-1", 100, None),
    ("", 100, None),
])
def test_parse_range(value: str, size: int, expected: ByteRange | None) -> None:
    assert parse_range(value, size) == expected


@pytest.mark.parametrize(("value", "size"), [
    ("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=-5", 0),
    ("bytes=" + "9" * 30 + "-", 100),
])
def test_parse_range_unsatisfiable(value: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(value, size)


@given(st.text(max_size=40), st.integers(0, 2**40))
@example("bytes=0-0", 0)
def test_parse_range_stays_within_the_file(value: str, size: int) -> None:
    try:
        r = parse_range(value, size)
    except RangeNotSatisfiable:
        return
    if r is not None:
        assert 0 <= r.start <= r.end < size


@given(size=st.integers(0, 300), first=st.none() | st.integers(0, 400), last=st.none() | st.integers(0, 400),
       unit=st.sampled_from(["bytes", "BYTES", "Bytes"]), pad=st.sampled_from(["", " ", "\t"]),
       extra=st.sampled_from(["", ",", " , "]))
def test_parse_range_matches_python_slicing(size: int, first: int | None, last: int | None, unit: str,
                                            pad: str, extra: str) -> None:
    """Oracle: what slicing a bytes object of ``size`` bytes gives for the same request."""
    data = bytes(range(256)) * 2
    data = data[:size]
    spec = f"{'' if first is None else first}-{'' if last is None else last}"
    value = f"{unit}={pad}{spec}{pad}{extra}"
    if first is None and last is None or (first is not None and last is not None and last < first):
        assert parse_range(value, size) is None  # invalid: the whole file
        return
    if first is None:
        assert last is not None
        satisfiable = last > 0 and size > 0
        expected = data[max(0, size - last):]
    else:
        satisfiable = first < size
        expected = data[first:] if last is None else data[first:last + 1]
    if not satisfiable:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(value, size)
        return
    r = parse_range(value, size)
    assert r is not None
    assert data[r.start:r.end + 1] == expected
    assert r.length == len(expected) > 0


def test_decide_precedence_and_validators() -> None:
    mtime = 1_700_000_000_123_456_789
    etag = etag_for(10, mtime)
    modified = formatdate(1_700_000_000, usegmt=True)
    ok = decide({}, 10, mtime, "text/plain")
    assert (ok.status, ok.start, ok.length) == (200, 0, 10)
    assert ("ETag", etag) in ok.headers and ("Last-Modified", modified) in ok.headers
    assert decide({"if-none-match": f'"a,b", W/{etag}'}, 10, mtime, "x").status == 304
    assert decide({"if-none-match": '"a,b"'}, 10, mtime, "x").status == 200
    not_modified = decide({"if-modified-since": modified}, 10, mtime, "x")
    assert not_modified.status == 304 and not_modified.length == 0
    assert all(name != "Content-Type" for name, _ in not_modified.headers)
    # If-None-Match decides alone when present
    assert decide({"if-none-match": '"x"', "if-modified-since": modified}, 10, mtime, "x").status == 200
    # 304 beats Range; a stale If-Range turns a range into the whole file
    assert decide({"if-none-match": etag, "range": "bytes=0-1"}, 10, mtime, "x").status == 304
    assert decide({"range": "bytes=0-1", "if-range": etag}, 10, mtime, "x").status == 206
    assert decide({"range": "bytes=0-1", "if-range": f"W/{etag}"}, 10, mtime, "x").status == 200
    assert decide({"range": "bytes=0-1", "if-range": modified}, 10, mtime, "x").status == 206
    assert decide({"range": "bytes=0-1", "if-range": "yesterday"}, 10, mtime, "x").status == 200
    assert etag_for(10, mtime + 1) != etag and etag_for(11, mtime) != etag


@pytest.mark.parametrize(("name", "ctype"), [
    ("a.txt", "text/plain; charset=utf-8"), ("a.html", "text/html; charset=utf-8"),
    ("a.css", "text/css; charset=utf-8"), ("a.json", "application/json; charset=utf-8"),
    ("a.svg", "image/svg+xml; charset=utf-8"), ("a.png", "image/png"), ("a.pdf", "application/pdf"),
    ("a.tar.gz", "application/gzip"), ("a.txt.bz2", "application/x-bzip2"), ("a.xz", "application/x-xz"),
    ("noext", "application/octet-stream"), ("a.unknownext", "application/octet-stream"),
])
def test_content_type(name: str, ctype: str) -> None:
    assert content_type(name) == ctype


# --------------------------------------------------------------------------------------------
# Units: the server on a memory stream (connection handling without an edge)
# --------------------------------------------------------------------------------------------


async def exchange_bytes(server: FileServer, data: bytes, *, eof: bool = True) -> bytes:
    """Send ``data`` to the server on a fresh memory stream; everything it sends until it ends."""
    ours, theirs = trio.testing.memory_stream_pair()
    out = bytearray()
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            await server.serve(theirs, None)  # type: ignore[arg-type]
            await theirs.aclose()

        nursery.start_soon(run)
        await ours.send_all(data)
        if eof:
            await ours.send_eof()
        while chunk := await ours.receive_some():
            out += chunk
    return bytes(out)


def heads(raw: bytes) -> list[str]:
    return [part.split("\r\n\r\n")[0] for part in raw.decode("latin-1").split("HTTP/1.1 ")[1:]]


async def test_connection_headers(shared_tree: Tree) -> None:
    server = FileServer.from_url(shared_tree.root.as_uri())
    with trio.fail_after(10):
        raw = await exchange_bytes(server, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                           b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert len(heads(raw)) == 1 and "Connection: close" in heads(raw)[0]
        raw = await exchange_bytes(server, b"GET /hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                                           b"HEAD /hello.txt HTTP/1.0\r\n\r\n"
                                           b"GET /hello.txt HTTP/1.0\r\n\r\n")
        assert len(heads(raw)) == 2
        assert "Connection: keep-alive" in heads(raw)[0] and "Connection: close" in heads(raw)[1]
        raw = await exchange_bytes(server, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert "Connection:" not in heads(raw)[0] and raw.endswith(b"\r\n\r\nhello\n")


async def test_request_bodies(shared_tree: Tree) -> None:
    server = FileServer.from_url(shared_tree.root.as_uri())
    get = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(10):
        # small bodies, sized or chunked, are read and dropped; the next request is answered
        raw = await exchange_bytes(server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                                   + get)
        assert [h.split("\r\n")[0] for h in heads(raw)] == ["405 Method Not Allowed", "200 OK"]
        raw = await exchange_bytes(server, b"PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                           b"5\r\nhello\r\n0\r\n\r\n" + get)
        assert [h.split("\r\n")[0] for h in heads(raw)] == ["405 Method Not Allowed", "200 OK"]
        # a GET with a body is still a GET
        raw = await exchange_bytes(server, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
                                           b"abc" + get)
        assert raw.count(b"hello\n") == 2
        # too big to drop, or behind Expect: 100-continue: answered, then the connection closes
        big = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {_server.MAX_DISCARD + 1}\r\n\r\n".encode()
        raw = await exchange_bytes(server, big, eof=False)
        assert len(heads(raw)) == 1 and "Connection: close" in heads(raw)[0]
        expect = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        raw = await exchange_bytes(server, expect, eof=False)
        assert len(heads(raw)) == 1 and "Connection: close" in heads(raw)[0]
        assert b"100 Continue" not in raw
        # malformed requests get a 400 and the end of the connection
        bad = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n"
        raw = await exchange_bytes(server, bad, eof=False)
        assert heads(raw)[0].startswith("400 ") and "Connection: close" in heads(raw)[0]
        raw = await exchange_bytes(server, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", eof=False)
        assert heads(raw)[0].startswith("505 ")
