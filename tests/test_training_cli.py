"""``lorareg train`` as users run it: the plan, several processes, base models that cannot load, an SD2
(v-prediction) base with aspect-ratio buckets, and every output format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import loralib
from tests.helpers.training import ROOT, small_dataset


def test_dry_run_checks_data_and_prints_the_plan(tmp_path, lorareg):
    data = small_dataset(tmp_path / "data", 3)
    res = lorareg("train", "--data", data, "--batch-size", "2", "--epochs", "5", "--gradient-accumulation-steps", "2",
                  "--dry-run", "--json")
    assert res.code == 0, res.err
    plan = json.loads(res.out)
    assert plan["layout"] == "tutorial" and plan["images"] == 3
    assert plan["steps_per_epoch"] == 1 and plan["total_steps"] == 5  # 2 batches, accumulated in one step
    assert plan["buckets"] == {"512x512": 3}


def test_several_processes_share_the_batches(tiny_sd1, tmp_path):
    """Two CPU processes under torchrun (what accelerate launch does on GPUs): DDP over gloo."""
    data = small_dataset(tmp_path / "data", 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lorareg", "train",
               "--base", str(tiny_sd1), "--data", str(data), "-o", str(tmp_path / "out"), "--name", "ddp",
               "--resolution", "32", "--rank", "4", "--max-train-steps", "2", "--no-tensorboard", "--json"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one JSON document: only the main process reports
    assert report["steps"] == 2 and report["epoch"] == 2  # two images over two processes: one step per epoch
    meta = loralib.inspect(report["adapter"]).metadata
    assert meta["ss_num_batches_per_epoch"] == "1" and meta["ss_total_batch_size"] == "2"


def test_base_models_that_cannot_load_are_one_clear_line(tmp_path, lorareg):
    data = small_dataset(tmp_path / "data", 1)
    common = ["--data", data, "-o", tmp_path / "out", "--max-train-steps", "1", "--no-tensorboard"]
    res = lorareg("train", "--base", "someone/no-such-model", *common)
    assert res.code == 1 and "cannot load the base model someone/no-such-model from the Hub" in res.err
    assert "lorareg tiny-model" in res.err and "Traceback" not in res.err
    (tmp_path / "folder").mkdir()
    res = lorareg("train", "--base", tmp_path / "folder", *common)
    assert res.code == 1 and "is not a diffusers model folder (it has no model_index.json)" in res.err
    module = loralib.LoraModule(torch.ones(1, 32), torch.ones(32, 1), 1.0)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = loralib.save(loralib.LoraAdapter({key: module}, "sd1"), tmp_path / "adapter.safetensors").path  # not a model
    res = lorareg("train", "--base", lora, *common)
    assert res.code == 1 and "adapter.safetensors is not a single-file Stable Diffusion checkpoint" in res.err
    assert not (tmp_path / "out").exists()


def test_sd2_v_prediction_and_buckets(tmp_path, lorareg):
    """An SD2-shaped base (width 1024, v-prediction in its scheduler config) trains on v, and images of
    three shapes train in three buckets; diffusers loads the result exactly."""
    from PIL import Image

    from tests.helpers.diffusers_oracle import load_with_diffusers

    assert lorareg("tiny-model", tmp_path / "base", "--arch", "sd2").code == 0
    data = tmp_path / "data"
    data.mkdir()
    for name, size in (("wide", (96, 48)), ("tall", (48, 96)), ("square", (64, 64))):
        Image.new("RGB", size, (200, 40, 40)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"pxl style, {name}")
    res = lorareg("train", "--base", tmp_path / "base", "--data", data, "-o", tmp_path / "out", "--name", "v",
                  "--resolution", "64", "--enable-bucket", "--bucket-step", "16", "--rank", "2", "--max-train-steps",
                  "3", "--train-text-encoder", "--no-tensorboard", "--json")
    assert res.code == 0, res.err
    path = json.loads(res.out)["adapter"]
    meta = loralib.inspect(path).metadata
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": {"48x80": 1, "64x64": 1, "80x48": 1}}
    _, warnings, injected, listed = load_with_diffusers("sd2", tmp_path / "base", path)
    assert warnings == [] and injected == len(loralib.load(path).modules)
    assert listed == {"unet": ["trained"], "text_encoder": ["trained"]}


def test_peft_and_diffusers_output_formats(tiny_sd1, tmp_path, lorareg):
    data = small_dataset(tmp_path / "data", 1)
    written = {}
    for fmt in ("peft", "diffusers", "kohya"):
        res = lorareg("train", "--base", tiny_sd1, "--data", data, "-o", tmp_path / fmt, "--name", "f", "--resolution",
                      "32", "--rank", "2", "--max-train-steps", "1", "--no-tensorboard", "--output-format", fmt,
                      "--save-dtype", "fp32", "--json")
        assert res.code == 0, res.err
        written[fmt] = loralib.load(json.loads(res.out)["adapter"])
        assert written[fmt].source_format.startswith(fmt)
    assert (tmp_path / "peft" / "f_peft").is_dir() and (tmp_path / "diffusers" / "f.safetensors").is_file()
    kohya = written["kohya"]
    for fmt in ("peft", "diffusers"):  # the same seed trains the same adapter; every format holds it exactly
        assert written[fmt].modules.keys() == kohya.modules.keys()
        for key, module in kohya.modules.items():
            assert torch.equal(written[fmt].modules[key].delta(), module.delta()), (fmt, key)
