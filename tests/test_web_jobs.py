"""The playground's actions as background jobs: merge, resize, convert, generate, push; progress and cancelling.

Each action is checked against the CLI command it stands for (same tensor data, same catalog
record) and against an outside oracle (dense ΔW, the Hub server's copy of the file).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lorareg.registry.catalog import Catalog
from tests.helpers.web_client import web_client


@pytest.fixture
def web(demo_catalog, tmp_path):
    with web_client(demo_catalog.home, tmp_path / "out") as client:
        client.demo = demo_catalog
        yield client


def run_job(web, form: dict | list) -> dict:
    """Start a job through the form, follow its page, wait, and return its final status."""
    started = web.post("/jobs", form)
    assert started.status_code == 303, started.text
    location = started.headers["location"]
    job_id = int(location.rsplit("/", 1)[1])
    assert web.client.get(location).status_code == 200
    web.jobs.wait(job_id, timeout=120)
    status = web.client.get(f"/jobs/{job_id}/status").json()
    assert status["finished"], status
    return status


def dense_delta(path, key):
    import loralib

    module = loralib.load(path).modules[key]
    return module.scale * (module.up.float().flatten(1) @ module.down.float().flatten(1))


def test_a_merge_job_writes_the_exact_weighted_sum_and_records_it_like_the_cli(web, lorareg, tmp_path):
    ids, files = web.demo.ids, web.demo.files
    status = run_job(web, [("action", "merge"), ("adapter", ids["pixel-art"]), ("weight", "0.7"),
                           ("adapter", ids["ink-sketch"]), ("weight", "-0.25"), ("method", "concat"),
                           ("format", "kohya"), ("output", "mix one")])
    assert status["state"] == "done" and status["done"] == status["total"] == 4, status
    result = status["result"]
    assert result["name"] == "mix one" and result["path"] == str(web.out / "mix one.safetensors")
    import loralib

    merged = loralib.load(result["path"])
    for key in merged.modules:
        expected = 0.7 * dense_delta(files / "pixel-art.safetensors", key) - 0.25 * dense_delta(
            files / "ink-sketch.safetensors", key)
        assert (dense_delta(result["path"], key) - expected).abs().max() < 1e-3 * expected.abs().max()
    with Catalog(web.demo.home) as catalog:
        entry = catalog.by_id(result["entry_id"])
        parents = catalog.parents(entry)
    assert [(p.name, p.weight) for p in parents] == [("pixel-art", 0.7), ("ink-sketch", -0.25)], [p.to_dict() for p in parents]
    assert entry.operation_name == "merge" and entry.source == "output"
    # the same merge through the CLI writes the same tensor data
    cli_out = tmp_path / "cli.safetensors"
    done = lorareg("--home", tmp_path / "cli-home", "merge", f"{files / 'pixel-art.safetensors'}:0.7",
                   f"{files / 'ink-sketch.safetensors'}:-0.25", "-o", cli_out, "--json")
    assert done.code == 0, done.err
    assert loralib.inspect(cli_out).hashes["tensor_sha256"] == entry.tensor_sha256
    page = web.client.get(f"/jobs/{status['id']}").text
    assert f'href="/a/{entry.id}"' in page and "mix one" in page
    assert f'<a href="/a/{entry.id}">mix one</a>' in web.client.get("/jobs").text


def test_resize_and_convert_jobs_match_the_cli(web, lorareg, tmp_path):
    import loralib

    ids, files = web.demo.ids, web.demo.files
    resized = run_job(web, {"action": "resize", "entry": ids["watercolor"], "rank": "2", "format": "kohya",
                            "output": "water-r2"})
    assert resized["state"] == "done", resized
    assert set(loralib.inspect(resized["result"]["path"]).ranks) == {2}
    cli_out = tmp_path / "r2.safetensors"
    assert lorareg("--home", tmp_path / "h", "resize", files / "watercolor.safetensors", "--rank", "2", "-o",
                   cli_out).code == 0
    assert loralib.inspect(cli_out).hashes["tensor_sha256"] == loralib.inspect(
        resized["result"]["path"]).hashes["tensor_sha256"]

    converted = run_job(web, {"action": "convert", "entry": ids["watercolor"], "format": "peft", "output": "water peft"})
    assert converted["state"] == "done", converted
    assert converted["result"]["path"] == str(web.out / "water peft")
    with Catalog(web.demo.home) as catalog:
        entry = catalog.by_id(converted["result"]["entry_id"])
        assert entry.format == "peft"
        source = catalog.by_id(ids["watercolor"])
        assert [e.name for e, _ in catalog.same_adapter(source)] == [entry.name]
        assert [p.name for p in catalog.parents(entry)] == ["watercolor"]
    page = web.client.get(f"/a/{ids['watercolor']}").text
    assert f'href="/a/{entry.id}">{entry.name}</a>' in page[page.index("Same adapter"):]


def test_bad_job_forms_are_refused_before_anything_runs(web):
    ids = web.demo.ids
    existing = web.out / "taken.safetensors"
    web.out.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"mine")
    cases = [
        ({"action": "convert", "entry": ids["pixel-art"], "format": "peft", "output": "../escape"}, "not a usable output name"),
        ({"action": "convert", "entry": ids["pixel-art"], "format": "peft", "output": "/etc/x"}, "not a usable output name"),
        ({"action": "convert", "entry": ids["pixel-art"], "format": "kohya", "output": "taken"}, "already exists"),
        ({"action": "convert", "entry": ids["pixel-art"], "format": "onnx", "output": "x"}, "unknown format"),
        ({"action": "resize", "entry": ids["pixel-art"], "rank": "abc", "output": "x"}, "rank must be a number"),
        ({"action": "resize", "entry": ids["pixel-art"], "output": "x"}, "needs a target rank"),
        ([("action", "merge"), ("adapter", ids["pixel-art"]), ("weight", "nan"), ("output", "m")], "weight must be"),
        ([("action", "merge"), ("output", "m")], "choose the adapters"),
        ({"action": "push", "entry": ids["pixel-art"], "repo": ""}, "give the Hub repo"),
        ({"action": "explode", "entry": ids["pixel-art"]}, "unknown action"),
    ]
    for form, message in cases:
        answer = web.post("/jobs", form)
        assert answer.status_code == 400 and message in answer.text, (form, answer.text[-400:])
    assert web.jobs.all() == [] and existing.read_bytes() == b"mine"


def test_a_job_that_fails_says_why_in_one_line(web):
    status = run_job(web, {"action": "generate", "entry": web.demo.ids["pixel-art"], "prompt": "a castle"})
    assert status["state"] == "failed"
    assert status["error"].startswith("no base model is configured for previews") and "\n" not in status["error"]


def test_jobs_report_progress_survive_reloads_and_can_be_cancelled(web):
    started = threading.Event()
    steps = []

    def slow(job):
        started.set()
        for i in range(1, 1000):
            job.progress(i, 1000)
            steps.append(i)
            time.sleep(0.01)
        return {}

    first = web.jobs.submit("test", "a slow job", slow)
    queued = web.jobs.submit("test", "waits its turn", lambda job: {"ran": True})
    assert started.wait(10)
    time.sleep(0.05)
    status = web.client.get(f"/jobs/{first.id}/status").json()
    assert status["state"] == "running" and 0 < status["done"] < 1000 and status["total"] == 1000
    assert web.client.get(f"/jobs/{first.id}").status_code == 200  # a reload finds it again
    titles = web.client.get("/jobs").text
    assert "a slow job" in titles and "waits its turn" in titles
    assert web.post(f"/jobs/{queued.id}/cancel", {}).status_code == 303
    token = web.csrf()
    answer = web.client.post(f"/jobs/{first.id}/cancel", headers={"x-csrf-token": token})
    assert answer.status_code == 200 and answer.json()["state"] in ("cancelling", "cancelled")
    web.jobs.wait(first.id, timeout=10)
    assert web.jobs.get(first.id).state == "cancelled" and len(steps) < 999
    assert web.jobs.get(queued.id).state == "cancelled" and web.jobs.get(queued.id).result == {}
    assert web.client.get(f"/jobs/{first.id}/status").json()["finished"] is True


def test_a_generate_job_renders_a_preview_and_records_it_as_a_sample(tmp_path, tiny_sd1, one_thread):
    import loralib
    from loralib.base_model import layer_shape, pipeline_layers
    from loralib.synthetic import random_adapter, select_layers
    from tests.helpers.diffusers_oracle import pipeline_class

    pipe = pipeline_class("sd1").from_pretrained(tiny_sd1)
    layers = select_layers({k: layer_shape(m) for k, m in pipeline_layers(pipe).items()}, feed_forward=False)
    path = loralib.save(random_adapter(layers, 2, seed=4, architecture="sd1"), tmp_path / "tiny-ink.safetensors").path
    home = tmp_path / "home"
    with Catalog(home) as catalog:
        entry_id = catalog.add(path, triggers=["inksk"]).entry.id
    with web_client(home, tmp_path / "out", base_model=str(tiny_sd1)) as web:
        page = web.client.get(f"/a/{entry_id}").text
        assert 'name="prompt"' in page and 'value="inksk"' in page
        status = run_job(web, {"action": "generate", "entry": entry_id, "prompt": "inksk, a cat", "seed": "5",
                               "steps": "2", "weight": "0.8"})
        assert status["state"] == "done", status["error"]
        assert status["done"] == status["total"] == 1
        image = status["result"]["images"][0]
        with Catalog(home) as catalog:
            samples = catalog.by_id(entry_id).samples
        assert [(s["path"], s["prompt"], s["seed"], s["weight"]) for s in samples] == [(image, "inksk, a cat", 5, 0.8)]
        assert samples[0]["parameters"]["Lora hashes"].startswith("tiny-ink: ")  # read back from the PNG
        from lorareg.registry.samples import png_text

        parameters = png_text(image)["parameters"]
        assert parameters.startswith("inksk, a cat <lora:tiny-ink:0.8>\n") and "Seed: 5" in parameters
        served = web.client.get(f"/media/{entry_id}/sample/0")
        assert served.status_code == 200 and served.content == Path(image).read_bytes()
        assert f'src="/media/{entry_id}/sample/0"' in web.client.get("/cards").text  # the card shows it now


def test_a_push_job_uploads_the_adapter_with_its_card(demo_catalog, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tests.helpers.hub_server import HubServer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(tokens={"hf_web_token": "alice"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_web_token")
        with web_client(demo_catalog.home, tmp_path / "out") as web:
            status = run_job(web, {"action": "push", "entry": demo_catalog.ids["pixel-art"], "repo": "alice/pixel"})
            assert status["state"] == "done", status
            assert status["result"]["commit"] == hub.head("alice/pixel")
            assert hub.file_bytes("alice/pixel", "pixel-art.safetensors") == (
                demo_catalog.files / "pixel-art.safetensors").read_bytes()
            assert "README.md" in hub.list_files("alice/pixel")
            refused = run_job(web, {"action": "push", "entry": demo_catalog.ids["pixel-art"], "repo": "bob/pixel"})
            assert refused["state"] == "failed" and "403" in refused["error"]
        assert hub.server_errors == []
    with Catalog(demo_catalog.home) as catalog:
        assert catalog.by_id(demo_catalog.ids["pixel-art"]).hub[0]["repo"] == "alice/pixel"
