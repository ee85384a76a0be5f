"""The playground against hostile files and hostile web pages: escaping, Host check, tokens, CSRF, file serving.

A LoRA file is untrusted input: its metadata (titles, trigger phrases, caption tags, training
settings) and whatever a user pasted into the catalog are shown in HTML. And any web page the
user visits can make the browser send requests to 127.0.0.1 (CSRF) or reach it under its own
name (DNS rebinding). Every page is parsed with html.parser to look for markup that would run.
"""

from __future__ import annotations

import json
import os

import pytest

from lorareg.registry.catalog import Catalog
from lorareg.web.app import http_url
from lorareg.web.security import Guard, host_name
from lorareg.web.server import is_loopback, prepare
from tests.helpers.web_catalog import lora_file, sample_png
from tests.helpers.web_client import BASE, injected_markup, web_client

SCRIPT = "<script>alert('xss')</script>"
BREAKOUT = "\"'><img src=x onerror=alert(1)>"
JS_URL = "javascript:alert(document.cookie)"
TEMPLATE = "{{ 7*7 }}{% raw %}"
HOSTILE = f"{SCRIPT}{BREAKOUT}{TEMPLATE}"


@pytest.fixture
def hostile(tmp_path):
    """A catalog whose only entry has markup in every field a page shows."""
    home = tmp_path / "home"
    files = tmp_path / "files"
    metadata = {"modelspec.title": HOSTILE, "modelspec.trigger_phrase": f"{JS_URL}, {SCRIPT}",
                "modelspec.description": HOSTILE, "ss_optimizer": HOSTILE, "ss_output_name": BREAKOUT,
                "ss_sd_model_name": JS_URL, HOSTILE: HOSTILE,
                "ss_tag_frequency": json.dumps({"1_x": {SCRIPT: 5, BREAKOUT: 3, TEMPLATE: 2}})}
    path = lora_file(files / "evil.safetensors", 1, metadata=metadata)
    image = sample_png(files / "s.png", (10, 10, 10), HOSTILE, 1)
    with Catalog(home) as catalog:
        entry = catalog.add(path, name=f"{BREAKOUT}{TEMPLATE}", tags=[SCRIPT, JS_URL, BREAKOUT],
                            triggers=[JS_URL, HOSTILE], description=HOSTILE,
                            samples=[{"path": str(image), "prompt": HOSTILE, "seed": HOSTILE}]).entry
    return home, entry


def _assert_clean(html: str, allowed=("/static/app.js",)) -> None:
    assert injected_markup(html, allowed) == []
    assert SCRIPT not in html and BREAKOUT not in html
    assert "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;" in html  # shown, as text
    assert "{{ 7*7 }}" in html and "{% raw %}" in html  # a template in a value stays text, never evaluated


def test_every_page_escapes_what_comes_from_the_file_and_the_catalog(hostile, tmp_path):
    home, entry = hostile
    with web_client(home, tmp_path / "out") as web:
        pages = {"/": web.client.get("/"), "/cards": web.client.get("/cards"),
                 "detail": web.client.get(f"/a/{entry.id}"), "compare": web.client.get(f"/compare?id={entry.id}"),
                 "merge": web.client.get(f"/merge?id={entry.id}"), "search": web.client.get("/cards?q=alert")}
        for label, page in pages.items():
            assert page.status_code == 200, label
            assert injected_markup(page.text) == [], label
            assert SCRIPT not in page.text and BREAKOUT not in page.text, label
        detail = pages["detail"].text
        _assert_clean(detail)
        assert f'data-copy="{JS_URL}"' in detail  # a trigger word is data to copy, not a link
        assert "javascript:" not in "".join(part.split('"')[0] for part in detail.split('href="')[1:])
        picked = web.client.get("/pick?q=alert").json()
        assert picked[0]["name"] == entry.name  # JSON, for textContent in the page


def test_the_exported_gallery_escapes_the_same_values(hostile, tmp_path):
    from lorareg.web.site import export_site

    home, entry = hostile
    export_site(home, tmp_path / "site")
    for page in (tmp_path / "site" / "index.html", tmp_path / "site" / "a" / f"{entry.id}.html"):
        html = page.read_text()
        assert injected_markup(html, ("static/gallery.js", "../static/gallery.js")) == [], page
        assert SCRIPT not in html and BREAKOUT not in html and "{{ 7*7 }}" in html
    index = json.loads((tmp_path / "site" / "index.json").read_text())
    assert index["adapters"][0]["name"] == entry.name  # the JSON keeps the value as it is


def test_links_never_take_a_javascript_url():
    assert http_url("javascript:alert(1)") == "" and http_url(" JavaScript:x") == ""
    assert http_url("data:text/html,<b>") == "" and http_url("//evil.example/x") == ""
    assert http_url("https://huggingface.co/alice/x") == "https://huggingface.co/alice/x"


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8765", True), ("localhost:8765", True), ("[::1]:8765", True), ("LOCALHOST", True),
    ("evil.example", False), ("evil.example:8765", False), ("127.0.0.1.evil.example:8765", False), ("", False),
    ("0.0.0.0:8765", False),
])
def test_the_host_header_must_name_this_server(demo_catalog, tmp_path, host, allowed):
    with web_client(demo_catalog.home, tmp_path / "out") as web:
        answer = web.client.get("/", headers={"host": host})
        assert (answer.status_code == 200) is allowed, answer.text
        if not allowed:
            assert answer.status_code == 400 and "DNS rebinding" in answer.text


def test_state_changing_requests_need_this_sessions_token(demo_catalog, tmp_path):
    entry_id = demo_catalog.ids["watercolor"]
    form = {"name": "hijacked", "tags": "", "triggers": "", "notes": ""}
    with web_client(demo_catalog.home, tmp_path / "out") as web:
        token = web.csrf()
        assert web.client.post(f"/a/{entry_id}/edit", data=form).status_code == 403  # no token
        assert web.client.post(f"/a/{entry_id}/edit", data={**form, "csrf": "0" * 40}).status_code == 403
        assert web.client.post(f"/a/{entry_id}/edit", data=form, headers={"x-csrf-token": "f" * 40}).status_code == 403
        # a page on another site that somehow knew the token is still refused by its Origin
        assert web.client.post(f"/a/{entry_id}/edit", data={**form, "csrf": token},
                               headers={"origin": "http://evil.example"}).status_code == 403
        assert web.client.post(f"/a/{entry_id}/edit", data={**form, "csrf": token},
                               headers={"sec-fetch-site": "cross-site"}).status_code == 403
        assert web.client.post(f"/a/{entry_id}/edit", data={**form, "csrf": token},
                               headers={"origin": "null"}).status_code == 403
        # another browser (no session cookie) cannot reuse it either
        from starlette.testclient import TestClient

        with TestClient(web.app, base_url=BASE) as other:
            assert other.post(f"/a/{entry_id}/edit", data={**form, "csrf": token}).status_code == 403
        # jobs and cancelling are state changes too
        assert web.client.post("/jobs", data={"action": "convert", "entry": entry_id, "format": "peft",
                                              "output": "x"}).status_code == 403
        assert web.jobs.all() == []
        with Catalog(demo_catalog.home) as catalog:
            assert catalog.by_id(entry_id).name == "watercolor"
        ok = web.client.post(f"/a/{entry_id}/edit", data={**form, "csrf": token}, headers={"origin": BASE},
                             follow_redirects=False)
        assert ok.status_code == 303
        with Catalog(demo_catalog.home) as catalog:
            assert catalog.by_id(entry_id).name == "hijacked"


def test_answers_carry_a_strict_content_security_policy(demo_catalog, tmp_path):
    with web_client(demo_catalog.home, tmp_path / "out") as web:
        for path in ("/", f"/a/{demo_catalog.ids['pixel-art']}", "/static/app.css", "/nothing"):
            headers = web.client.get(path).headers
            assert "script-src 'self'" in headers["content-security-policy"]
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
            assert headers["referrer-policy"] == "same-origin"  # with no-referrer, form posts say Origin: null
        cookie = web.client.get("/").headers.get("set-cookie") or ""
        session = web.client.cookies.get("lorareg_session_8765")
        assert session and len(session) >= 32
        assert cookie == "" or ("HttpOnly" in cookie and "SameSite=Strict" in cookie)


def test_with_a_token_every_request_must_prove_it(demo_catalog, tmp_path):
    secret = "s3cret-token-for-tests"
    with web_client(demo_catalog.home, tmp_path / "out", token=secret, bind_host="0.0.0.0") as web:
        client = web.client
        assert client.get("/").status_code == 401
        assert client.get(f"/media/{demo_catalog.ids['pixel-art']}/sample/0").status_code == 401
        assert client.get("/?token=wrong").status_code == 401
        assert client.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/", headers={"authorization": f"Bearer {secret}"}).status_code == 200
        signed = client.get(f"/?tag=style&token={secret}", follow_redirects=False)
        assert signed.status_code == 303 and signed.headers["location"] == "/?tag=style"
        assert "HttpOnly" in signed.headers["set-cookie"] and secret not in signed.headers["set-cookie"]
        assert client.get("/").status_code == 200  # the cookie now
        # with a wildcard bind the server answers to any name, since the token protects it
        assert client.get("/", headers={"host": "lan-box.local:8765"}).status_code == 200


def test_only_loopback_runs_without_a_token(tmp_path):
    from lorareg.web.actions import Settings

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.4.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    served = prepare(Settings(None, tmp_path), "127.0.0.1", 0)
    try:
        assert served.guard.token is None and served.url == f"http://127.0.0.1:{served.guard.port}/"
    finally:
        served.sock.close()
    served = prepare(Settings(None, tmp_path), "0.0.0.0", 0)
    try:
        assert served.guard.token and len(served.guard.token) >= 24
        assert served.url == f"http://127.0.0.1:{served.guard.port}/?token={served.guard.token}"
    finally:
        served.sock.close()
    assert host_name("[::1]:80") == "::1" and host_name("Example.ORG:80") == "example.org"
    assert Guard(port=1, bind_host="0.0.0.0").host_allowed("lan-box:1") is False  # no token: loopback names only


def _set_samples(home, entry_id: int, samples: list[dict]) -> None:
    with Catalog(home) as catalog:
        catalog.conn.execute("UPDATE adapters SET samples = ? WHERE id = ?", (json.dumps(samples), entry_id))


def test_files_are_served_only_from_catalog_sample_and_preview_paths(demo_catalog, tmp_path):
    entry_id = demo_catalog.ids["ink-sketch"]
    real_png = demo_catalog.files / "samples" / "pixel-art-0.png"
    outside = tmp_path / "secret.png"
    outside.write_bytes(real_png.read_bytes())
    link_to_png = tmp_path / "link.png"
    os.symlink(outside, link_to_png)
    link_to_passwd = tmp_path / "passwd.png"
    os.symlink("/etc/passwd", link_to_passwd)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("<svg onload=alert(1)>")
    _set_samples(demo_catalog.home, entry_id, [
        {"path": "/etc/passwd"}, {"path": str(link_to_png)}, {"path": str(link_to_passwd)}, {"path": str(not_an_image)},
        {"path": str(tmp_path / "missing.png")}, {"path": str(tmp_path)}, {"path": str(outside)}])
    with web_client(demo_catalog.home, tmp_path / "out") as web:
        for index in range(6):
            assert web.client.get(f"/media/{entry_id}/sample/{index}").status_code == 404, index
        listed = web.client.get(f"/media/{entry_id}/sample/6")  # a catalog-known image is served
        assert listed.status_code == 200 and listed.content == real_png.read_bytes()
        for path in ("/media/1/sample/../../../../etc/passwd", "/media/1/sample/-1", "/media//etc/passwd",
                     "/media/1/sample/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/../registry/catalog.py",
                     "/static/%2e%2e/app.py", "/static//etc/passwd", "/media/1/preview/../../etc/passwd"):
            answer = web.client.get(path)
            assert answer.status_code == 404, path
            assert b"root:" not in answer.content and b"Catalog" not in answer.content


def test_a_symlinked_preview_is_refused(demo_catalog, tmp_path):
    entry_id = demo_catalog.ids["ink-sketch"]
    with Catalog(demo_catalog.home) as catalog:
        adapter = catalog.files(catalog.by_id(entry_id))[0].path
    preview = adapter.removesuffix(".safetensors") + ".preview.png"
    os.symlink("/etc/passwd", preview)
    try:
        with web_client(demo_catalog.home, tmp_path / "out") as web:
            assert web.client.get(f"/media/{entry_id}/preview").status_code == 404
    finally:
        os.unlink(preview)
