"""Hub commands: ``push`` and ``pull``.

They use ``HF_ENDPOINT``, ``HF_TOKEN`` and the login saved by ``hf auth login``; a token is
never printed or stored by lorareg.
"""

from __future__ import annotations

import click

from .output import note, plain, print_json, steps
from .refs import catalog_home, complete_names


@click.command("push")
@click.argument("reference", shell_complete=complete_names)
@click.option("--repo", "repo_id", required=True, help="The Hub repo to push to, user/name (created if needed).")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--also", default="", metavar="LAYOUTS",
              help="Also upload these layouts, comma-separated: diffusers, peft, comfyui (needs torch to convert).")
@click.option("--license", "license_", help="License id for the model card (default: the base model's).")
@click.option("--base-model", help="Hub id of the base model for the card (default: from metadata or architecture).")
@click.option("--message", "-m", help="Commit message.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def push_command(ctx: click.Context, reference: str, repo_id: str, private: bool, also: str, license_: str | None,
                 base_model: str | None, message: str | None, as_json: bool) -> None:
    """Upload a catalog adapter to the Hugging Face Hub in kohya format, with a model card.

    REFERENCE is a catalog name, a hash prefix or a file (added to the catalog first). The card
    has the Hub's LoRA metadata (base_model, license, instance_prompt, tags, widget from sample
    images) and says how to load the adapter in diffusers, ComfyUI and AUTOMATIC1111.

    \b
    Examples:
      lorareg push pixel-art --repo alice/pixel-art-lora
      lorareg push pixel-art --repo alice/pixel-art-lora --private --also diffusers,peft
    """
    import os

    from lorareg.registry.catalog import Catalog
    from lorareg.registry.hub import push

    with Catalog(catalog_home(ctx)) as catalog:
        entry = catalog.find(reference)
        if entry is None and os.path.exists(reference):
            entry = catalog.add(reference).entry
        entry = entry or catalog.get(reference)
        with steps(enabled=not as_json) as step:
            result = push(catalog, entry, repo_id, private=private, also=also.split(","), license=license_,
                          base_model=base_model, message=message, progress=step)
    if as_json:
        print_json(result.to_dict())
        return
    click.echo(plain(f"pushed {entry.name} to {result.repo_id} at commit {result.commit[:12]}: {', '.join(result.files)}"))
    note(result.url)


@click.command("pull")
@click.argument("repo")
@click.option("--file", "filename", help="The file to download (needed when the repo holds several adapters).")
@click.option("--name", help="Catalog name (default: the file's or the repo's name).")
@click.option("--tag", "tags", multiple=True, help="A tag to add (repeatable).")
@click.option("--dir", "local_dir", type=click.Path(file_okay=False),
              help="Download into this folder instead of the Hugging Face cache.")
@click.option("--force", is_flag=True,
              help="With --dir: replace a file of the same name that holds other content (only once the "
                   "download is complete and verified).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def pull_command(ctx: click.Context, repo: str, filename: str | None, name: str | None, tags: tuple[str, ...],
                 local_dir: str | None, force: bool, as_json: bool) -> None:
    """Download an adapter from the Hub (REPO is user/name[@revision]), verify it, and add it to the catalog.

    The revision (branch, tag or commit) is pinned to the commit it resolves to; the file's
    SHA-256 is checked against what the Hub lists, and a mismatch deletes the download and
    registers nothing. File names that would land outside the download folder are refused. In a
    --dir folder a file of the same name is reused when identical, and never replaced without --force.

    \b
    Examples:
      lorareg pull alice/pixel-art-lora
      lorareg pull alice/pixel-art-lora@v1.0 --file pixel-art.safetensors --dir ~/webui/models/Lora
    """
    from pathlib import Path

    from lorareg.registry.catalog import Catalog
    from lorareg.registry.hub import pull

    from .paths import make_parents

    if local_dir is not None:
        make_parents(Path(local_dir.rstrip("/") or local_dir))
    with Catalog(catalog_home(ctx)) as catalog, steps(enabled=not as_json) as step:
        result = pull(catalog, repo, filename=filename, name=name, tags=tags, local_dir=local_dir, force=force,
                      progress=step)
    if as_json:
        print_json(result.to_dict())
        return
    entry = result.added.entry
    verb = "added" if result.added.created else "already in the catalog:"
    click.echo(plain(f"{verb} {entry.name} from {result.repo_id}@{result.revision} (commit {result.commit[:12]}), "
                     f"SHA-256 verified"))
    click.echo(f"  {plain(result.path)}")
