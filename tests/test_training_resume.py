"""Checkpoints: a stopped run resumed with ``--resume latest`` ends bit-for-bit where an uninterrupted
run ends; Ctrl-C (a real SIGINT to a real process) leaves a checkpoint that resumes; a diverging
loss stops with one clear line; the finished adapter is registered in the catalog with its config.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loralib
from loralib.training import Trainer, load_config, train
from loralib.training.checkpoints import list_checkpoints
from tests.helpers.training import ROOT, quick_settings, small_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread

# Every source of randomness is on: noise offset, multires and input-perturbation noise, caption dropout, tag
# shuffling and dropout, LoRA dropout, random crop and flip; and every state that must survive a resume: the EMA of
# the weights, the validation losses, the optimizer's moments (with LoRA+ groups).
RANDOM_EVERYTHING = dict(max_train_steps=5, batch_size=1, learning_rate=2e-3, lr_scheduler="cosine", lr_warmup_steps=2,
                         noise_offset=0.05, caption_dropout=0.3, dropout=0.1, snr_gamma=5.0, crop="random",
                         random_flip=True, gradient_accumulation_steps=2, multires_noise_iterations=3,
                         ip_noise_gamma=0.1, shuffle_caption=True, keep_tokens=1, caption_tag_dropout=0.2,
                         loss_type="huber", debiased_estimation=True, masked_loss=True, ema_decay=0.8,
                         loraplus_lr_ratio=4, validate_every_n_steps=2)


def _tensors(path):
    return load_file(path)


def test_resume_latest_continues_bit_for_bit(tiny_sd1, tmp_path, lorareg):
    # 3 images, batch 1, 2 batches per step: steps of 2 and 1 batches, 2 steps per epoch; step 3 is mid-epoch 2
    data = small_dataset(tmp_path / "data", 3)
    settings = {**RANDOM_EVERYTHING, "validation_dir": small_dataset(tmp_path / "validation", 1)}
    straight = train(load_config(None, quick_settings(tiny_sd1, data, tmp_path / "straight", **settings)))
    assert straight.steps == 5 and [step for step, _ in straight.validation_losses] == [2, 4, 5]

    config_file = tmp_path / "resumed.toml"
    config = load_config(None, quick_settings(tiny_sd1, data, tmp_path / "resumed", **settings))
    config_file.write_text(config.to_toml())
    holder = {}
    trainer = Trainer(config, on_step=lambda report: report.step == 3 and holder["t"].request_stop())
    holder["t"] = trainer
    stopped = trainer.run()
    assert stopped.interrupted and stopped.steps == 3 and stopped.save is None
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [3]
    assert not (tmp_path / "resumed" / "t.safetensors").exists()

    res = lorareg("train", config_file, "--resume", "latest", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["steps"] == 5 and not report["interrupted"]
    assert report["validation_losses"] == [list(entry) for entry in straight.validation_losses]

    expected, got = _tensors(straight.save.path), _tensors(report["adapter"])
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # the optimizer and scheduler states continued too: the last checkpoints agree exactly
    final = tmp_path / "resumed" / "checkpoints" / "step-00000005"
    a = torch.load(straight.checkpoint / "training_state.pt", weights_only=True)
    b = torch.load(final / "training_state.pt", weights_only=True)
    assert a["lr_scheduler"] == b["lr_scheduler"] and a["losses"] == b["losses"]
    assert a["validation_losses"] == b["validation_losses"]
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    # the saved adapter is the EMA (save_ema): it matched above; the raw weights and the average agree too
    for name in ("trainable.safetensors", "ema.safetensors"):
        expected, got = _tensors(straight.checkpoint / name), _tensors(final / name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name


def test_resume_refuses_a_changed_network_and_extends_a_finished_run(tiny_sd1, tmp_path, lorareg):
    data = small_dataset(tmp_path / "data", 1)
    settings = quick_settings(tiny_sd1, data, tmp_path / "out", max_train_steps=1)
    train(load_config(None, {**settings, "max_train_steps": 1}))
    res = lorareg("train", "--base", tiny_sd1, "--data", data, "-o", tmp_path / "out", "--name", "t",
                  "--resolution", "32", "--rank", "8", "--max-train-steps", "3", "--no-tensorboard",
                  "--resume", "latest", "--force")
    assert res.code == 1
    assert "different rank (4 -> 8)" in res.err and "Traceback" not in res.err
    # the same network, more steps: the finished run goes on and replaces its own adapter (no --force)
    res = lorareg("train", "--base", tiny_sd1, "--data", data, "-o", tmp_path / "out", "--name", "t",
                  "--resolution", "32", "--rank", "4", "--max-train-steps", "3", "--no-tensorboard", "--save-dtype",
                  "fp32", "--resume", "latest", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["steps"] == 3
    assert loralib.inspect(tmp_path / "out" / "t.safetensors").metadata["ss_steps"] == "3"


def test_ctrl_c_saves_a_checkpoint_that_resumes_with_the_command_it_prints(tiny_sd1, tmp_path):
    data = small_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lorareg", "train", "--base", str(tiny_sd1), "--data", str(data), "-o", str(out),
               "--name", "t", "--resolution", "32", "--rank", "4", "--max-train-steps", "12", "--no-tensorboard",
               "--force"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("step 1/"):
                process.send_signal(signal.SIGINT)
                break
        _out_text, err_rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    err = "".join(lines) + err_rest
    assert process.returncode == 130, err
    assert "interrupted at step" in err and "--resume latest" in err and "Traceback" not in err
    saved = list_checkpoints(out)
    assert len(saved) == 1
    step = saved[0][0]
    assert step >= 1 and not (out / "t.safetensors").exists()

    # the command it printed, run as printed, continues the run with its command-line settings
    printed = next(line for line in err.splitlines() if "continue with: " in line).split("continue with: ", 1)[1]
    words = shlex.split(printed)
    assert words[0] == "lorareg" and "--force" not in words and words[-2:] == ["--resume", "latest"]
    done = subprocess.run([sys.executable, "-m", "lorareg", *words[1:], "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["steps"] == 12 and not report["interrupted"] and Path(report["adapter"]) == out / "t.safetensors"


def test_a_diverging_loss_stops_with_a_clear_message(tiny_sd1, tmp_path, lorareg):
    data = small_dataset(tmp_path / "data", 1)
    res = lorareg("train", "--base", tiny_sd1, "--data", data, "-o", tmp_path / "out", "--name", "t",
                  "--resolution", "32", "--optimizer", "sgd", "--lr", "1e30", "--max-grad-norm", "1e30",
                  "--max-train-steps", "6", "--no-tensorboard")
    assert res.code == 1
    assert "error: the loss became" in res.err and "Lower learning_rate" in res.err
    assert "Traceback" not in res.err
    assert not (tmp_path / "out" / "t.safetensors").exists()


def test_the_trained_adapter_is_registered_with_its_config(tiny_sd1, tmp_path, lorareg):
    """One CLI run with the trimmings: bf16, gradient checkpointing, intermediate saves, samples, TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loralib.generation import read_parameters

    data = small_dataset(tmp_path / "data", 1)
    out = tmp_path / "out"
    res = lorareg("train", "--base", tiny_sd1, "--data", data, "-o", out, "--name", "catalogued", "--resolution", "32",
                  "--rank", "4", "--max-train-steps", "2", "--trigger-word", "pxl style", "--mixed-precision", "bf16",
                  "--gradient-checkpointing", "--save-every-n-steps", "1", "--sample-prompts", "pxl style, a castle",
                  "--sample-steps", "1")
    assert res.code == 0, res.err
    assert "registered as catalogued" in res.err
    assert (out / "catalogued-step00000001.safetensors").is_file() and (out / "catalogued.safetensors").is_file()
    sample = out / "samples" / "catalogued-step00000002-00.png"
    assert "Training step: 2" in read_parameters(sample) and read_parameters(sample).startswith("pxl style, a castle")
    events = EventAccumulator(str(out / "runs" / "catalogued")).Reload()
    assert {"loss", "lr"} <= set(events.Tags()["scalars"]) and "samples/00" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("loss")] == [1, 2]

    shown = lorareg("show", "catalogued", "--json")
    assert shown.code == 0, shown.err
    entry = json.loads(shown.out)
    assert "pxl style" in json.dumps(entry)
    operation = entry.get("operation") or {}
    assert operation.get("operation") == "train"
    assert operation["params"]["rank"] == 4 and operation["params"]["mixed_precision"] == "bf16"
    assert operation["dataset"]["images"] == 1 and operation["base_model"] == str(tiny_sd1)
    # the samples rendered with the saved adapter belong to it; the trigger word is the declared one
    assert [(s["path"], s["prompt"], s["weight"], s["source"]) for s in entry["samples"]] == [
        (str(sample), "pxl style, a castle", 1.0, "train")]
    assert entry["samples"][0]["parameters"]["Model hash"] and entry["samples"][0]["seed"] is not None
    assert entry["triggers"] == ["pxl style"]  # not the caption sentence "a red circle on a light background"
