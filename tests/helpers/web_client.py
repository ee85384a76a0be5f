"""The playground's app in-process for HTTP tests, and an HTML checker for injected markup."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"


@dataclass
class Web:
    """A TestClient on the app, the app, and its output folder."""

    client: object
    app: object
    out: Path

    @property
    def jobs(self):
        return self.app.state.pg.jobs

    def csrf(self, path: str = "/") -> str:
        """The session's CSRF token, as a page carries it."""
        return csrf_of(self.client.get(path).text)

    def post(self, path: str, data: dict | list, **kwargs):
        """A form POST with the session's CSRF token."""
        token = self.csrf()
        items = list(data.items()) if isinstance(data, dict) else list(data)
        form: dict[str, list[str]] = {}
        for key, value in [*items, ("csrf", token)]:
            form.setdefault(key, []).append(str(value))
        return self.client.post(path, data=form, follow_redirects=False, **kwargs)


@contextmanager
def web_client(home: Path, out: Path, *, base_model: str | None = None, token: str | None = None,
               bind_host: str = "127.0.0.1") -> Iterator[Web]:
    """The app over the catalog at ``home``, reached as http://127.0.0.1:8765 through Starlette's TestClient."""
    from starlette.testclient import TestClient

    from lorareg.web.actions import Settings
    from lorareg.web.app import create_app
    from lorareg.web.security import Guard

    app = create_app(Settings(str(home), out, base_model), Guard(port=PORT, bind_host=bind_host, token=token))
    try:
        with TestClient(app, base_url=BASE) as client:
            yield Web(client, app, out)
    finally:
        app.state.pg.jobs.shutdown()


def csrf_of(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', html)
    assert match, "the page has no CSRF token"
    return match.group(1)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.script_text.append(data)


def injected_markup(html: str, allowed_scripts: tuple[str, ...] = ("/static/app.js",)) -> list[str]:
    """What in ``html`` would run or navigate as code: inline scripts, foreign script sources, event-handler
    attributes, ``javascript:`` URLs, and element names a hostile value uses (an empty list when clean)."""
    parser = _Collector()
    parser.feed(html)
    problems = [f"inline script: {text[:60]!r}" for text in parser.script_text]
    for tag, attrs in parser.tags:
        if tag == "script" and attrs.get("src") not in allowed_scripts:
            problems.append(f"script src={attrs.get('src')!r}")
        if tag in ("img", "iframe", "object", "embed", "svg") and any(
                (attrs.get(k) or "") == "x" for k in ("src", "data")):
            problems.append(f"injected <{tag}>")
        for name, value in attrs.items():
            if name.startswith("on"):
                problems.append(f"<{tag} {name}=…>")
            if name in ("href", "src", "action", "formaction", "xlink:href") and \
                    (value or "").strip().lower().startswith(("javascript:", "data:text", "vbscript:")):
                problems.append(f"<{tag} {name}={value!r}>")
    return problems
