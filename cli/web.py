"""The playground commands: ``serve`` (the local web app), ``export-site`` and ``push-site`` (the gallery).

They need the ``web`` extra (``pip install 'lorareg[web]'``); torch is imported only by the
actions that transform weights, when they run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from loralib.errors import LoraError

from .output import note, print_json, progress
from .refs import catalog_home


class MissingExtraError(LoraError):
    """The ``web`` extra is not installed."""


def _require_web() -> None:
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"the playground needs {exc.name}, which is not installed",
                                "Install it with: pip install 'lorareg[web]'") from None


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback requires an access token (printed in the URL).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port (0: a free one).")
@click.option("--open", "open_browser", is_flag=True, help="Open the playground in the web browser.")
@click.option("--token", envvar="LORAREG_WEB_TOKEN",
              help="Access token to require (default: none on loopback, a random one with --host).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Another host name the server may be reached as (repeatable; e.g. behind a proxy).")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where merges, resizes, conversions and previews are written (default: outputs/ in the catalog folder).")
@click.option("--base-model", metavar="MODEL",
              help="Base model for preview images: a diffusers folder or a .safetensors checkpoint.")
@click.pass_context
def serve_command(ctx: click.Context, host: str, port: int, open_browser: bool, token: str | None,
                  allow_hosts: tuple[str, ...], output_dir: str | None, base_model: str | None) -> None:
    """Start the playground: a local web page over the catalog, with merge, resize, convert, previews and push.

    It listens on 127.0.0.1 and a free port unless told otherwise; stop it with Ctrl-C. With
    --host (reachable from other machines) every request needs the access token, which is part
    of the printed address.

    \b
    Examples:
      lorareg serve --open
      lorareg serve --base-model ./base_model --port 8765
      lorareg serve --host 0.0.0.0 --port 8765      # prints http://…:8765/?token=…
    """
    _require_web()
    from lorareg.web.actions import Settings
    from lorareg.web.server import default_output_dir, prepare, serve

    home = catalog_home(ctx)
    out = Path(output_dir).expanduser() if output_dir else default_output_dir(home)
    if base_model and not Path(base_model).expanduser().exists():
        note(f"note: {base_model} is not a local path; it will be treated as a Hub id when a preview is rendered")
    served = prepare(Settings(home, out.resolve(), base_model), host, port, token=token, allow_hosts=allow_hosts)
    click.echo(f"lorareg playground at {served.url}", err=True)
    note(f"outputs go to {out}; stop with Ctrl-C")
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(0.5, webbrowser.open, [served.url]).start()
    serve(served)


_SELECTION = [
    click.option("--tag", "tags", multiple=True, help="Only adapters with this tag (repeatable: any of them)."),
    click.option("--arch", "architecture", help="Only this architecture (sd1, sd2, sdxl…)."),
    click.option("--title", help="The gallery's title (default: 'LoRA gallery')."),
]


def _selection(function):
    for option in reversed(_SELECTION):
        function = option(function)
    return function


@click.command("export-site")
@click.argument("folder", type=click.Path(file_okay=False))
@_selection
@click.option("--force", is_flag=True, help="Write into a folder that is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.pass_context
def export_site_command(ctx: click.Context, folder: str, tags: tuple[str, ...], architecture: str | None,
                        title: str | None, force: bool, as_json: bool) -> None:
    """Write a static gallery of the catalog (or a selection) to FOLDER: HTML pages, images and index.json.

    It opens from disk (index.html) with no server, and can be published as is, for example with
    `lorareg push-site`. Sample and preview images are copied; adapter files are not.

    \b
    Examples:
      lorareg export-site gallery/
      lorareg export-site gallery/ --tag style --tag character --title "My styles"
    """
    _require_web()
    from loralib.files.atomic import refuse_overwrite
    from lorareg.web.site import export_site

    refuse_overwrite(folder, force)  # before the progress bar, so the error is the only line
    with progress("exporting", enabled=not as_json and sys.stderr.isatty()) as update:
        report = export_site(catalog_home(ctx), folder, tags=tags, architecture=architecture, title=title,
                             force=force, progress=update)
    if as_json:
        print_json(report.to_dict())
        return
    click.echo(f"wrote a gallery of {report.entries} adapters ({report.images} images) to {report.folder}")
    note(f"open {report.folder / 'index.html'} in a browser, or publish it with: lorareg push-site --space USER/NAME")


@click.command("push-site")
@click.option("--space", "space_id", required=True, help="The Hugging Face Space to publish to, user/name "
                                                          "(created as a static Space if needed).")
@click.option("--from", "source", type=click.Path(exists=True, file_okay=False),
              help="Publish this folder written by export-site (default: export the catalog now).")
@_selection
@click.option("--private", is_flag=True, help="Create the Space as private.")
@click.option("--message", "-m", help="Commit message.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def push_site_command(ctx: click.Context, space_id: str, source: str | None, tags: tuple[str, ...],
                      architecture: str | None, title: str | None, private: bool, message: str | None,
                      as_json: bool) -> None:
    """Publish the gallery as a static Hugging Face Space (sdk: static, index.html).

    Without --from, the catalog (or the --tag/--arch selection) is exported to a temporary
    folder first. Uses HF_TOKEN or the login saved by `hf auth login`.

    \b
    Examples:
      lorareg push-site --space alice/lora-gallery
      lorareg push-site --space alice/styles --tag style --private
      lorareg push-site --space alice/lora-gallery --from gallery/
    """
    import tempfile

    from lorareg.registry.hub import push_site

    if source is None:
        _require_web()
        from lorareg.web.site import export_site

        with tempfile.TemporaryDirectory(prefix="lorareg-site-") as tmp:
            folder = Path(tmp) / "site"
            with progress("exporting", enabled=not as_json and sys.stderr.isatty()) as update:
                export_site(catalog_home(ctx), folder, tags=tags, architecture=architecture, title=title,
                            progress=update)
            result = push_site(folder, space_id, private=private, title=title, tags=tags, message=message)
    else:
        result = push_site(source, space_id, private=private, title=title, tags=tags, message=message)
    if as_json:
        print_json(result.to_dict())
        return
    click.echo(f"published {len(result.files)} files to the Space {result.space_id} at commit {result.commit[:12]}")
    note(result.url)
