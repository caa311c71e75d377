"""The web inspector and status page in a real headless browser (Debian's chromium + Playwright).

A real edge, agent (with its web server) and upstream run on loopback in a Trio thread; the
tests drive the pages the way a user does and check what the upstream received.  One more
server (the pages plus a fake API holding 10,000 captured requests) measures how the list
copes with many entries.  Screenshots go to ``$TUNNELD_ARTIFACTS`` (or the test's tmp dir).

Without a browser the tests skip, or fail when ``TUNNELD_INTEROP_REQUIRED=1`` (CI).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .inspector_servers import FakeApi, LiveStack, TrioThread

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

TIMEOUT_MS = 15_000


def _chromium() -> str | None:
    for candidate in (os.environ.get("TUNNELD_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def _missing(reason: str) -> None:
    if os.environ.get("TUNNELD_INTEROP_REQUIRED") == "1":
        pytest.fail(f"{reason} (required: TUNNELD_INTEROP_REQUIRED=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    path = _chromium()
    if path is None:
        _missing("no chromium browser (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    live = LiveStack(tmp_path_factory.mktemp("inspector"))
    with TrioThread(live.run) as _:
        yield live


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    base = os.environ.get("TUNNELD_ARTIFACTS")
    folder = Path(base) / "inspector" if base else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
    # A script error or a CSP violation (reported on the console) is a bug of the page.
    assert errors == [], errors


def _open(page: Page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def _row(page: Page, text: str) -> Any:
    return page.locator("#list .row", has_text=text)


def test_live_filter_replay_and_modify(stack: LiveStack, page: Page, artifacts: Path) -> None:
    from playwright.sync_api import expect

    response = page.goto(stack.web_url + "/inspect/http")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector("body[data-ready='1']")
    expect(page.locator("#live")).to_have_text("live")

    # A request through the tunnel appears without reloading (the SSE feed).
    got = stack.public_get("/live/first?q=1&name=tunneld", headers={"X-Trace": "abc123"})
    assert got.status_code == 200
    row = _row(page, "/live/first")
    expect(row).to_have_count(1)
    row.click()
    detail = page.locator("#detail")
    expect(detail.locator(".req-title")).to_have_text("GET /live/first?q=1&name=tunneld")
    expect(detail.locator(".msg-request")).to_contain_text("X-Trace")
    expect(detail.locator(".msg-request table.kv").first).to_contain_text("tunneld")  # query params
    expect(detail.locator(".msg-response pre.pretty")).to_contain_text('"path": "/live/first"')

    stack.public_get("/live/second", headers={"X-Trace": "zzz"})
    expect(_row(page, "/live/second")).to_have_count(1)

    # Filters combine with AND and live in the URL; a reload restores them.
    page.fill("input[name=path]", "/live/*")
    page.fill("input[name=header]", "x-trace: ABC")
    expect(page.locator("#list .row")).to_have_count(1)
    expect(page.locator("#count")).to_contain_text("1 of")
    page.fill("input[name=status]", "404")
    expect(page.locator("#list .row")).to_have_count(0)
    page.fill("input[name=status]", "2xx")
    page.fill("input[name=duration]", "<30s")
    page.fill("input[name=size]", ">=10")
    expect(page.locator("#list .row")).to_have_count(1)
    page.fill("input[name=size]", ">1MB")
    expect(page.locator("#list .row")).to_have_count(0)
    page.fill("input[name=size]", "bogus")
    expect(page.locator("input[name=size]")).to_have_class("invalid")
    page.fill("input[name=size]", "")
    page.wait_for_function("location.search.includes('header=') && !location.search.includes('size=')")
    assert "path=%2Flive%2F*" in page.url and "status=2xx" in page.url
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("input[name=header]") == "x-trace: ABC"
    expect(page.locator("#list .row")).to_have_count(1)

    # Replay with one click: a new entry marked as a replay, and the upstream saw it twice.
    _row(page, "/live/first").click()
    before = stack.upstream.count("/live/first?q=1&name=tunneld")
    page.click("#replay")
    replay_row = page.locator("#list .row", has=page.locator(".tag.replay"))
    expect(replay_row).to_have_count(1)
    assert stack.upstream.count("/live/first?q=1&name=tunneld") == before + 1
    replay_row.click()
    page.click("#compare")
    expect(page.locator(".compare .original .req-title")).to_have_text("GET /live/first?q=1&name=tunneld")
    expect(page.locator(".compare .replayed .req-title")).to_have_text("GET /live/first?q=1&name=tunneld")
    page.screenshot(path=str(artifacts / "inspector-compare.png"))

    # Modify and replay: method, path, a header, a trailer and the body, as the upstream gets them.
    page.click("#reset-filters")
    _row(page, "/live/second").first.click()
    page.click("#modify")
    dialog = page.locator("#modify-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("input[name=method]").fill("PUT")
    dialog.locator("input[name=path]").fill("/changed/path?v=2")
    headers = dialog.locator("textarea[name=headers]")
    original_headers = headers.input_value()
    headers.fill(original_headers + "\nnot a header line")        # refused in the editor, nothing sent
    dialog.locator("#modify-send").click()
    expect(dialog.locator("#modify-error")).to_contain_text('headers line')
    expect(dialog).to_be_visible()
    headers.fill(original_headers.replace("X-Trace: zzz", "X-Trace: modified") + "\nX-Added: yes")
    dialog.locator("textarea[name=trailers]").fill("X-Checksum: 42")
    dialog.locator("textarea[name=body]").fill('{"edited": true}')
    page.screenshot(path=str(artifacts / "inspector-modify.png"))
    dialog.locator("#modify-send").click()
    expect(dialog).to_be_hidden()
    expect(_row(page, "/changed/path")).to_have_count(1)
    _row(page, "/changed/path").click()
    expect(page.locator("#detail .msg-request")).to_contain_text("Trailers")
    expect(page.locator("#detail .msg-request")).to_contain_text("X-Checksum")
    expect(page.locator("#detail .msg-request pre.pretty")).to_contain_text('"edited": true')
    seen = stack.upstream.last("/changed/path?v=2")
    assert seen["method"] == "PUT"
    assert seen["headers"]["x-trace"] == "modified" and seen["headers"]["x-added"] == "yes"
    assert seen["body"] == b'{"edited": true}'
    assert seen["trailers"].get("x-checksum") == "42"

    page.screenshot(path=str(artifacts / "inspector.png"), full_page=True)


def test_bodies_escaping_curl_and_har(stack: LiveStack, page: Page, artifacts: Path) -> None:
    from playwright.sync_api import expect

    _open(page, stack.web_url + "/")
    # Attacker-controlled path and header: shown as text, never run.
    evil_path = "/xss/<script>window.pwned=1</script>"
    stack.public_raw(f"GET {evil_path} HTTP/1.1\r\nHost: {{host}}\r\n"
                     "X-Evil: <img src=x onerror=\"window.pwned=2\">\r\nConnection: close\r\n\r\n")
    row = _row(page, "<script>window.pwned=1</script>")
    expect(row).to_have_count(1)
    row.click()
    expect(page.locator("#detail .req-title")).to_have_text(f"GET {evil_path}")
    expect(page.locator("#detail .msg-request")).to_contain_text('<img src=x onerror="window.pwned=2">')
    assert page.evaluate("window.pwned") is None
    assert page.locator("#detail img, #detail script").count() == 0

    # Malformed JSON: shown raw, the error's position marked.
    stack.public_post("/bodies/badjson", b'{"a": 1,, "b": 2}', "application/json")
    _row(page, "/bodies/badjson").click()
    req = page.locator("#detail .msg-request")
    expect(req.locator(".syntax-error .error")).to_contain_text("Invalid JSON")
    expect(req.locator(".syntax-error .error")).to_contain_text("column 9")
    expect(req.locator("mark.err")).to_have_text(",")

    # Valid JSON pretty-printed; XML pretty-printed and its error located; form fields; binary.
    stack.public_post("/bodies/json", b'{"list":[1,2.50,{"k":"v"}],"big":12345678901234567890}',
                      "application/vnd.api+json")
    _row(page, "/bodies/json").click()
    expect(page.locator("#detail .msg-request pre.pretty")).to_contain_text('"big": 12345678901234567890')
    expect(page.locator("#detail .msg-request pre.pretty")).to_contain_text('    2.50,')

    stack.public_post("/bodies/xml", b"<?xml version='1.0'?><a x='1'><b>text</b><c/></a>", "application/xml")
    _row(page, "/bodies/xml").click()
    expect(page.locator("#detail .msg-request pre.pretty")).to_contain_text('  <b>text</b>')
    stack.public_post("/bodies/badxml", b"<a>\n  <b></a>", "text/xml")
    _row(page, "/bodies/badxml").click()
    expect(page.locator("#detail .msg-request .syntax-error .error")).to_contain_text("Invalid XML")
    expect(page.locator("#detail .msg-request .syntax-error .error")).to_contain_text("line 2")

    stack.public_post("/bodies/form", b"user=ann+lee&role=%3Cadmin%3E&empty=",
                      "application/x-www-form-urlencoded")
    _row(page, "/bodies/form").click()
    form = page.locator("#detail .msg-request .form table.kv")
    expect(form).to_contain_text("ann lee")
    expect(form).to_contain_text("<admin>")

    blob = bytes(range(256)) * 40 + b"\x00\xff\xfe"
    stack.public_post("/bodies/binary", blob, "application/octet-stream")
    _row(page, "/bodies/binary").click()
    expect(page.locator("#detail .msg-request .binary .note")).to_contain_text("Binary body, 10.0 KB")
    page.click("#detail .msg-request .tab-hex")
    expect(page.locator("#detail .msg-request pre.hex")).to_contain_text("00 01 02 03")
    page.click("#detail .msg-request .tab-raw")
    expect(page.locator("#detail .msg-request")).to_contain_text("binary data")

    stack.public_post("/bodies/gzip", gzip.compress(b'{"zipped": [1, 2, 3]}'), "application/json",
                      {"Content-Encoding": "gzip"})
    _row(page, "/bodies/gzip").click()
    expect(page.locator("#detail .msg-request .note").first).to_contain_text("decoded from gzip")
    expect(page.locator("#detail .msg-request pre.pretty")).to_contain_text('"zipped": [')

    multipart = (b"--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello <b>\r\n"
                 b"--XyZ\r\nContent-Disposition: form-data; name=\"doc\"; filename=\"a.bin\"\r\n"
                 b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\x02\r\n--XyZ--\r\n")
    stack.public_post("/bodies/multipart", multipart, "multipart/form-data; boundary=XyZ")
    _row(page, "/bodies/multipart").click()
    parts = page.locator("#detail .msg-request .form table.kv")
    expect(parts).to_contain_text("hello <b>")
    expect(parts).to_contain_text('file "a.bin" (application/octet-stream, 3 B)')

    # Copy as curl: the command reaches the same upstream.
    _row(page, "/bodies/form").click()
    page.click("#copy-curl")
    command = page.input_value("#curl-text")
    assert command.startswith("curl -X POST ") and "/bodies/form" in command
    assert "--data-binary 'user=ann+lee&role=%3Cadmin%3E&empty='" in command
    assert "Content-Type: application/x-www-form-urlencoded" in command
    page.click("#curl-dialog button")

    # HAR 1.2 export of what the filters show.
    page.fill("input[name=path]", "/bodies/")
    expect(page.locator("#count")).to_contain_text("8 of")
    with page.expect_download() as info:
        page.click("#export-har")
    har = json.loads(Path(info.value.path()).read_text())
    assert har["log"]["version"] == "1.2"
    urls = [e["request"]["url"] for e in har["log"]["entries"]]
    assert len(urls) == 8 and all("/bodies/" in u for u in urls)
    binary = next(e for e in har["log"]["entries"] if e["request"]["url"].endswith("/bodies/binary"))
    assert base64.b64decode(binary["request"]["postData"]["text"]) == blob
    page.screenshot(path=str(artifacts / "inspector-bodies.png"), full_page=True)

    # Clear requests (after a confirmation): the list empties, in this page and in the API.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#clear")
    expect(page.locator("#list .row")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    assert httpx.get(stack.web_url + "/api/requests/http", timeout=10).json()["requests"] == []


def test_status_page(stack: LiveStack, page: Page, artifacts: Path) -> None:
    from playwright.sync_api import expect

    for k in range(3):
        stack.public_get(f"/status/check/{k}")
    response = page.goto(stack.web_url + "/status")
    assert response is not None and response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    content = page.content()
    assert stack.token not in content                          # the authtoken never in full
    assert stack.token[:4] in content
    section = page.locator("section.tunnel[data-tunnel='web (http)']")
    expect(section).to_contain_text(stack.public_url)
    expect(section).to_contain_text(f"http://localhost:{stack.upstream.port}")
    count = section.locator("td[data-metric='http.count']")
    expect(count).not_to_have_text("0")
    seen = int(count.inner_text())
    for k in range(2):
        stack.public_get(f"/status/more/{k}")
    # status.js refreshes the metrics from /api/tunnels.
    expect(count).not_to_have_text(str(seen), timeout=TIMEOUT_MS)
    expect(page.locator("#session-status")).to_have_text("online")
    expect(page.locator(".status-page")).to_contain_text("server_addr")
    page.screenshot(path=str(artifacts / "status.png"), full_page=True)

    with httpx.Client(base_url=stack.web_url, timeout=10) as client:
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/../_web.py").status_code == 404
        assert client.get("/static/nope.js").status_code == 404
        etag = client.get("/static/app.css").headers["etag"]
        assert client.get("/static/app.css", headers={"If-None-Match": etag}).status_code == 304


def test_ten_thousand_requests_stay_responsive(browser: Browser, page: Page, artifacts: Path) -> None:
    from playwright.sync_api import expect

    api = FakeApi(count=10_000)
    with TrioThread(api.run):
        try:
            t0 = time.monotonic()
            _open(page, api.url + "/")
            expect(page.locator("#count")).to_contain_text("10,000 requests")
            loaded = time.monotonic() - t0
            rows = page.locator("#list .row").count()
            assert rows < 120, f"{rows} rows in the DOM: the list is not virtualised"
            t0 = time.monotonic()
            page.fill("input[name=status]", "5xx")
            expect(page.locator("#count")).to_contain_text("2,000 of 10,000 requests")
            filtered = time.monotonic() - t0
            page.fill("input[name=status]", "")
            # The list re-renders on the next animation frame: scroll only once the whole
            # list is back, or the scroll lands at the end of the 2,000-row filtered list.
            expect(page.locator("#count")).to_have_text(re.compile(r"^10,000 requests"))
            page.locator("#list").evaluate("el => { el.scrollTop = el.scrollHeight; }")
            expect(_row(page, "/item/0?")).to_have_count(1)       # the oldest, at the bottom
            _row(page, "/item/0?").click()
            expect(page.locator("#detail .req-title")).to_have_text("GET /item/0?n=0")
            page.screenshot(path=str(artifacts / "inspector-10k.png"))
        finally:
            page.goto("about:blank")   # leave before the server goes (its live feed is open)
    (artifacts / "inspector-10k.txt").write_text(
        f"10,000 requests: listed in {loaded:.2f}s, 5xx filter in {filtered:.2f}s, {rows} DOM rows\n")
    print(f"10k: load {loaded:.2f}s, filter {filtered:.2f}s, {rows} rows")
    assert loaded < 30 and filtered < 10


JSON_CASES = [
    # (body, error message or None, error offset)
    ('{"a": [1, 2.0e3, -0.5, true, null], "b": {"c": "\\u00e9\\n"}}', None, None),
    ('{"a":1,}', "expected a string key", 7),
    ("[1 2]", "expected ',' or ']'", 3),
    ('{"a": tru}', "unexpected character", 6),
    ('{"a":1} x', "unexpected data after the JSON value", 8),
    ("", "unexpected end of input", 0),
    ('{"a": "x', "unterminated string", 6),
    ('"\\q"', "invalid escape in string", 1),
    ("01", "unexpected data after the JSON value", 1),
    ("[" * 600 + "]" * 600, "nested too deeply", None),
]
XML_CASES = [
    ("<?xml version='1.0'?><!-- hi --><a x='1' y=\"&amp;\"><b>t</b><![CDATA[<raw>]]><c/></a>", None, None),
    ("<a><b></a>", "does not match <b>", 6),
    ('<a x="1" x="2"/>', "duplicate attribute x", 9),
    ("<a>&nbsp;</a>", "undefined entity &nbsp;", 3),
    ("<a>1 & 2</a>", "'&' that starts no entity reference", 5),
    ("<a/><b/>", "a second root element", 4),
    ("hello<a/>", "text before the root element", 0),
    (" <?xml version='1.0'?><a/>", "XML declaration not at the start", 1),
    ("<a><b>", "<b> is not closed", 6),
    ("<a x=1/>", "expected a quoted attribute value", 5),
]


def test_syntax_checks_and_filters(stack: LiveStack, page: Page) -> None:
    """The JSON/XML checkers and the filter language, run in the page's own code."""
    _open(page, stack.web_url + "/")
    for body, error, pos in JSON_CASES:
        got = page.evaluate("s => window.tunneldInspector.formatJSON(s)", body)
        if error is None:
            assert "pieces" in got, (body, got)
        else:
            assert error in got["error"] and (pos is None or got["pos"] == pos), (body, got)
    pretty = page.evaluate("s => window.tunneldInspector.formatJSON(s).pieces.map(p => p[1]).join('')",
                           '{"a":[1,{"b":null}],"n":1.50}')
    assert pretty == '{\n  "a": [\n    1,\n    {\n      "b": null\n    }\n  ],\n  "n": 1.50\n}'
    for body, error, pos in XML_CASES:
        got = page.evaluate("s => window.tunneldInspector.formatXML(s)", body)
        if error is None:
            assert "pieces" in got, (body, got)
        else:
            assert error in got["error"] and got["pos"] == pos, (body, got)

    matches = page.evaluate("""() => {
        const { compileFilters, summarize } = window.tunneldInspector;
        const mk = (uri, status, size, ms, headers) => summarize({
            id: uri + status, tunnel_name: 'web', start: '2026-01-01T00:00:00Z', duration: ms * 1e6,
            request: {method: 'GET', uri, headers: headers || {}},
            response: {status_code: status, headers: {}, body_size: size}});
        const reqs = [mk('/api/a?x=1', 200, 10, 1), mk('/api/b', 404, 5000, 3, {'X-Id': ['7']}),
                      mk('/api/c/d', 503, 2048, 2), mk('/web', 500, 0, 0.5)];
        const run = (f) => { const c = compileFilters(f);
            return {ids: reqs.filter(c.pred).map(s => s.uri), errors: c.errors}; };
        return {
            cls: run({status: '4xx, 503'}), size: run({size: '>1k'}), range: run({size: '1-2k'}),
            dur: run({duration: '<=2ms'}), glob: run({path: '/api/*'}), deep: run({path: '/api/**'}),
            sub: run({path: 'x=1'}), header: run({header: 'x-id: 7'}), has: run({header: 'X-Id'}),
            and: run({status: '5xx', size: '>=2KB', duration: '>1ms'}), bad: run({duration: '>fast'}),
        };
    }""")
    assert matches["cls"]["ids"] == ["/api/b", "/api/c/d"]
    assert matches["size"]["ids"] == ["/api/b", "/api/c/d"]
    assert matches["range"]["ids"] == ["/api/a?x=1", "/api/c/d"]
    assert matches["dur"]["ids"] == ["/api/a?x=1", "/api/c/d", "/web"]
    assert matches["glob"]["ids"] == ["/api/a?x=1", "/api/b"]
    assert matches["deep"]["ids"] == ["/api/a?x=1", "/api/b", "/api/c/d"]
    assert matches["sub"]["ids"] == ["/api/a?x=1"]
    assert matches["header"]["ids"] == matches["has"]["ids"] == ["/api/b"]
    assert matches["and"]["ids"] == ["/api/c/d"]
    assert "duration" in matches["bad"]["errors"] and len(matches["bad"]["ids"]) == 4
