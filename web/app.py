"""The playground's web application (Starlette): pages over the catalog, actions as background jobs.

::

    from lorareg.web.app import create_app
    from lorareg.web.actions import Settings
    from lorareg.web.security import Guard
    app = create_app(Settings(home=None, output_dir=Path("outputs")), Guard(port=8765))

Pages are rendered on the server with Jinja2 (autoescape on for every template); a small script
(``static/app.js``) filters the grid as you type, copies text and follows jobs. Every route reads
and writes through :class:`lorareg.registry.catalog.Catalog` and the loralib functions the CLI
calls; see :mod:`lorareg.web.security` for what protects the server.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loralib.errors import InvalidArgumentError, LoraError
from lorareg.registry.catalog import SORTS, Catalog, clean_tags

from . import actions, media, views
from .actions import FORMATS, MERGE_METHODS, Settings
from .jobs import Jobs
from .security import Guard, GuardMiddleware

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 48
FACETS_TTL_S = 30.0
MAX_COMPARE = 6


def template_environment() -> Environment:
    """The Jinja2 environment of the pages and the exported site: autoescape on for every template."""
    from loralib.units import human_size

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = lambda n: human_size(n or 0)
    env.filters["http_url"] = http_url
    return env


def http_url(value: object) -> str:
    """``value`` when it is an http(s) URL, else an empty string: links never take a ``javascript:`` URL."""
    text = str(value or "").strip()
    return text if urlsplit(text).scheme in ("http", "https") and urlsplit(text).netloc else ""


class Playground:
    """The application's state: settings, jobs, templates and a short-lived cache of the filter values."""

    def __init__(self, settings: Settings, guard: Guard) -> None:
        self.settings = settings
        self.guard = guard
        self.jobs = Jobs()
        self.env = template_environment()
        self._facets: tuple[float, dict] | None = None

    def catalog(self) -> Catalog:
        return Catalog(self.settings.home)

    def facets(self, catalog: Catalog) -> dict:
        if self._facets is None or time.monotonic() - self._facets[0] > FACETS_TTL_S:
            self._facets = (time.monotonic(), catalog.facets())
        return self._facets[1]

    def changed(self) -> None:
        self._facets = None

    def page(self, request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        html = self.env.get_template(name).render(csrf=request.state.csrf, path=request.url.path,
                                                  base_model=self.settings.base_model, hash_link=_hash_link,
                                                  entry_link=_entry_link, **context)
        return HTMLResponse(html, status, headers={"cache-control": "no-store"})


def _hash_link(tensor_sha256: str) -> str:
    return f"/h/{tensor_sha256}"


def _entry_link(entry_id: int) -> str:
    return f"/a/{entry_id}"


# -- the grid -------------------------------------------------------------------------------- #

GRID_KEYS = ("q", "arch", "format", "tag", "base", "sort")


def grid_query(request: Request) -> dict[str, str]:
    """The grid's filters from the URL (empty ones left out)."""
    params = request.query_params
    query = {k: " ".join(params.get(k, "").split())[:200] for k in GRID_KEYS}
    return {k: v for k, v in query.items() if v}


def _page_number(request: Request) -> int:
    try:
        return max(1, min(int(request.query_params.get("page", "1")), 1_000_000))
    except ValueError:
        return 1


def grid_results(catalog: Catalog, query: dict[str, str], page: int) -> dict[str, Any]:
    """One page of cards for the filters, with the total and the pager's links."""
    filters = {"architecture": query.get("arch"), "format": query.get("format"), "tag": query.get("tag"),
               "base_model": query.get("base")}
    offset = (page - 1) * PAGE_SIZE
    error = None
    try:
        sort = query.get("sort") if query.get("sort") in SORTS else None
        if query.get("q"):  # by relevance unless another order is chosen
            entries, total = catalog.search(query["q"], sort=sort, limit=PAGE_SIZE, offset=offset, **filters)
        else:
            entries = catalog.list(sort=sort or "name", limit=PAGE_SIZE, offset=offset, **filters)
            total = catalog.count(**filters) if len(entries) == PAGE_SIZE or page > 1 else len(entries)
    except InvalidArgumentError as exc:
        entries, total, error = [], 0, str(exc)
    pages = max(1, math.ceil(total / PAGE_SIZE))

    def link(number: int) -> str:
        return "/?" + urlencode({**query, "page": number}) if 1 <= number <= pages and number != page else ""

    return {"cards": views.cards(catalog, entries), "total": total, "page": page, "pages": pages,
            "previous": link(page - 1), "next": link(page + 1), "error": error, "query": query,
            "first": offset + 1 if entries else 0, "last": offset + len(entries)}


def grid_page(request: Request) -> HTMLResponse:
    pg: Playground = request.app.state.pg
    query = grid_query(request)
    with pg.catalog() as catalog:
        results = grid_results(catalog, query, _page_number(request))
        facets = pg.facets(catalog)
    return pg.page(request, "grid.html", {"results": results, "facets": facets, "sorts": list(SORTS),
                                          "query": query})


def grid_fragment(request: Request) -> HTMLResponse:
    pg: Playground = request.app.state.pg
    with pg.catalog() as catalog:
        results = grid_results(catalog, grid_query(request), _page_number(request))
    return pg.page(request, "_results.html", {"results": results})


# -- one adapter ----------------------------------------------------------------------------- #

def _entry_or_404(catalog: Catalog, entry_id: int):
    entry = catalog.by_id(entry_id)
    if entry is None:
        raise HTTPException(404, f"There is no adapter {entry_id} in the catalog.")
    return entry


def _detail(request: Request, entry_id: int, error: str | None = None, status: int = 200) -> HTMLResponse:
    pg: Playground = request.app.state.pg
    with pg.catalog() as catalog:
        context = views.detail(catalog, _entry_or_404(catalog, entry_id))
    return pg.page(request, "detail.html", {**context, "error": error, "saved": "saved" in request.query_params,
                                            "formats": FORMATS}, status)


def detail_page(request: Request) -> HTMLResponse:
    return _detail(request, request.path_params["id"])


def split_list(text: str) -> list[str]:
    """A comma-separated field as a list of trimmed, non-empty items."""
    return [" ".join(part.split()) for part in str(text or "").split(",") if part.strip()]


async def edit_entry(request: Request) -> Response:
    """Save the edit form: name, tags, trigger words and notes."""
    pg: Playground = request.app.state.pg
    entry_id = request.path_params["id"]
    form = await request.form()

    def save() -> None:
        with pg.catalog() as catalog:
            entry = _entry_or_404(catalog, entry_id)
            tags = clean_tags(split_list(form.get("tags", "")))
            triggers = split_list(form.get("triggers", ""))
            kept = {t.casefold() for t in triggers}
            catalog.update(entry.tensor_sha256, name=str(form.get("name", entry.name)),
                           description=str(form.get("notes", entry.description or "")),
                           add_tags=tags, remove_tags=[t for t in entry.tags if t not in tags],
                           add_triggers=triggers, remove_triggers=[t for t in entry.triggers if t.casefold() not in kept])

    try:
        await run_in_threadpool(save)
    except LoraError as exc:
        return await run_in_threadpool(_detail, request, entry_id, str(exc), 400)
    pg.changed()
    return RedirectResponse(f"/a/{entry_id}?saved=1#edit", 303)


def by_hash(request: Request) -> Response:
    pg: Playground = request.app.state.pg
    with pg.catalog() as catalog:
        entry = catalog.by_tensor_hash(request.path_params["hash"])
    if entry is None:
        raise HTTPException(404, "No adapter with this tensor hash is in the catalog.")
    return RedirectResponse(f"/a/{entry.id}", 303)


def _ids(request: Request, key: str = "id") -> list[int]:
    ids = []
    for value in request.query_params.getlist(key):
        if value.isdigit() and int(value) not in ids:
            ids.append(int(value))
    return ids


def compare_page(request: Request) -> HTMLResponse:
    pg: Playground = request.app.state.pg
    with pg.catalog() as catalog:
        entries = [e for e in (catalog.by_id(i) for i in _ids(request)[:MAX_COMPARE]) if e is not None]
        samples = [views.sample_views(e) for e in entries]
    return pg.page(request, "compare.html", {"entries": entries, "rows": views.compare_rows(entries) if entries else [],
                                             "samples": samples})


# -- actions --------------------------------------------------------------------------------- #

def merge_page(request: Request) -> HTMLResponse:
    pg: Playground = request.app.state.pg
    with pg.catalog() as catalog:
        chosen = [e for e in (catalog.by_id(i) for i in _ids(request)) if e is not None]
    return pg.page(request, "merge.html", {"chosen": chosen, "methods": MERGE_METHODS, "formats": FORMATS,
                                           "output_dir": str(pg.settings.output_dir)})


def pick(request: Request) -> JSONResponse:
    """Adapters for the merge builder's search box: id, name, architecture."""
    pg: Playground = request.app.state.pg
    text = request.query_params.get("q", "").strip()
    with pg.catalog() as catalog:
        try:
            entries = catalog.search(text, limit=12)[0] if text else catalog.list(sort="updated", limit=12)
        except InvalidArgumentError:
            entries = []
    return JSONResponse([{"id": e.id, "name": e.name, "architecture": e.architecture, "format": e.format,
                          "rank": e.rank_text} for e in entries])


def _number(form, key: str, kind=float, default=None, low=None, high=None):
    text = str(form.get(key, "") or "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise InvalidArgumentError(f"{key} must be a number, not {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidArgumentError(f"{key} must be between {low} and {high} (got {text})")
    return value


def plan_job(pg: Playground, form) -> tuple[str, str, Any]:
    """The kind, title and work of the job a form asks for (checked before anything runs)."""
    settings = pg.settings
    action = str(form.get("action", ""))
    fmt = str(form.get("format", "kohya"))
    name = str(form.get("output", ""))
    if action == "merge":
        ids = [int(i) for i in form.getlist("adapter") if str(i).isdigit()]
        weights = [_number({"weight": w}, "weight", float, 1.0, -10, 10) for w in form.getlist("weight")]
        if not ids or len(weights) != len(ids):
            raise InvalidArgumentError("choose the adapters to merge, each with a weight")
        options = {"method": str(form.get("method", "concat")), "rank": _number(form, "rank", int, None, 1, 4096),
                   "density": _number(form, "density", float, None, 0, 1), "seed": _number(form, "seed", int, 0, 0),
                   "fmt": fmt, "name": name}
        actions.output_path(settings, name, fmt)  # a bad name fails now, not in the background
        work = functools.partial(actions.merge, settings=settings, inputs=list(zip(ids, weights, strict=True)),
                                 **options)
        return "merge", f"merge {len(ids)} adapters into {name}", work
    entry_id = _number(form, "entry", int, None, 1)
    if entry_id is None:
        raise InvalidArgumentError(f"unknown action {action!r}" if action not in
                                   ("resize", "convert", "generate", "push") else "which adapter?")
    if action == "resize":
        rank = _number(form, "rank", int, None, 1, 4096)
        if rank is None:
            raise InvalidArgumentError("resize needs a target rank")
        actions.output_path(settings, name, fmt)
        work = functools.partial(actions.resize, settings=settings, entry_id=entry_id, rank=rank, fmt=fmt, name=name)
        return "resize", f"resize to rank {rank} as {name}", work
    if action == "convert":
        actions.output_path(settings, name, fmt)
        work = functools.partial(actions.convert, settings=settings, entry_id=entry_id, fmt=fmt, name=name)
        return "convert", f"convert to {fmt} as {name}", work
    if action == "generate":
        options = {"prompt": str(form.get("prompt", "")), "weight": _number(form, "weight", float, 0.8, -10, 10),
                   "seed": _number(form, "seed", int, 0, 0, 2**32 - 1), "steps": _number(form, "steps", int, 20, 1, 200),
                   "count": _number(form, "count", int, 1, 1, 16)}
        work = functools.partial(actions.generate, settings=settings, entry_id=entry_id, **options)
        return "generate", f"preview: {options['prompt'][:60]}", work
    if action == "push":
        repo = str(form.get("repo", "")).strip()
        if not repo:
            raise InvalidArgumentError("give the Hub repo to push to, as user/name")
        work = functools.partial(actions.push, settings=settings, entry_id=entry_id, repo_id=repo,
                                 private=bool(form.get("private")))
        return "push", f"push to {repo}", work
    raise InvalidArgumentError(f"unknown action {action!r}")


async def start_job(request: Request) -> Response:
    pg: Playground = request.app.state.pg
    form = await request.form()
    try:
        kind, title, work = await run_in_threadpool(plan_job, pg, form)
    except LoraError as exc:
        return pg.page(request, "error.html", {"status": 400, "message": str(exc)}, 400)

    def run(job):
        try:
            return work(job=job)
        finally:
            pg.changed()

    job = pg.jobs.submit(kind, title, run)
    return RedirectResponse(f"/jobs/{job.id}", 303)


def _job_or_404(request: Request):
    job = request.app.state.pg.jobs.get(request.path_params["id"])
    if job is None:
        raise HTTPException(404, "There is no such job (jobs are kept while the server runs).")
    return job


def jobs_page(request: Request) -> HTMLResponse:
    pg: Playground = request.app.state.pg
    return pg.page(request, "jobs.html", {"jobs": pg.jobs.all()})


def job_page(request: Request) -> HTMLResponse:
    pg: Playground = request.app.state.pg
    return pg.page(request, "job.html", {"job": _job_or_404(request)})


def job_status(request: Request) -> JSONResponse:
    return JSONResponse(_job_or_404(request).to_dict(), headers={"cache-control": "no-store"})


def cancel_job(request: Request) -> Response:
    job = _job_or_404(request)
    request.app.state.pg.jobs.cancel(job.id)
    if request.headers.get("x-csrf-token"):  # from the page's script
        return JSONResponse(job.to_dict())
    return RedirectResponse(f"/jobs/{job.id}", 303)


# -- images ---------------------------------------------------------------------------------- #

def _image_response(path: str | None) -> Response:
    found = media.read_image(path) if path else None
    if found is None:
        raise HTTPException(404, "No such image.")
    data, kind = found
    return Response(data, media_type=kind, headers={"cache-control": "private, max-age=60"})


def sample_image(request: Request) -> Response:
    pg: Playground = request.app.state.pg
    with pg.catalog() as catalog:
        entry = _entry_or_404(catalog, request.path_params["id"])
    return _image_response(media.sample_path(entry, request.path_params["n"]))


def preview_image(request: Request) -> Response:
    pg: Playground = request.app.state.pg
    with pg.catalog() as catalog:
        entry = _entry_or_404(catalog, request.path_params["id"])
        paths = [f.path for f in catalog.files(entry)]
    return _image_response(media.preview_of(paths))


# -- errors and the application -------------------------------------------------------------- #

def _error_page(request: Request, status: int, message: str) -> Response:
    pg: Playground = request.app.state.pg
    if "csrf" not in request.scope.get("state", {}):
        return Response(message, status, media_type="text/plain")
    return pg.page(request, "error.html", {"status": status, "message": message}, status)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return _error_page(request, exc.status_code, exc.detail)


async def lora_error(request: Request, exc: LoraError) -> Response:
    return _error_page(request, 400, str(exc))


def create_app(settings: Settings, guard: Guard) -> Starlette:
    """The Starlette application for a catalog, protected by ``guard``."""
    routes = [
        Route("/", grid_page),
        Route("/cards", grid_fragment),
        Route("/a/{id:int}", detail_page),
        Route("/a/{id:int}/edit", edit_entry, methods=["POST"]),
        Route("/h/{hash}", by_hash),
        Route("/compare", compare_page),
        Route("/merge", merge_page),
        Route("/pick", pick),
        Route("/jobs", jobs_page),
        Route("/jobs", start_job, methods=["POST"]),
        Route("/jobs/{id:int}", job_page),
        Route("/jobs/{id:int}/status", job_status),
        Route("/jobs/{id:int}/cancel", cancel_job, methods=["POST"]),
        Route("/media/{id:int}/sample/{n:int}", sample_image),
        Route("/media/{id:int}/preview", preview_image),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(GuardMiddleware, guard=guard)],
                    exception_handlers={HTTPException: http_error, LoraError: lora_error})
    app.state.pg = Playground(settings, guard)
    return app
