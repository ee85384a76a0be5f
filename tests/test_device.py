"""--device: choosing and checking where composition computes, and that every module goes there and back.

This machine has no GPU, so the CUDA path itself is not run here: the tests check the choice
(auto, cpu, cuda, cuda:N), the one-line refusal when a GPU is asked for but absent, and — through a
stand-in for the transfer to the device — that merge, resize, to_lora, extract and bake move every
module they compute on and store results back on the CPU, with results equal to the CPU path.
"""

from __future__ import annotations

import pytest
import torch

import loralib
import loralib.device
from loralib.compose import bake, extract, merge, resize, to_lora
from loralib.device import on_device, resolve_device
from loralib.errors import InvalidArgumentError
from loralib.lycoris.synthetic import random_lycoris_adapter
from tests.helpers.compose_cases import SMALL_LAYERS, adapter


def test_auto_is_the_cpu_without_a_gpu_and_the_gpu_with_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("choice", ["cuda", "cuda:0", "CUDA"])
def test_cuda_without_a_gpu_is_one_readable_line(monkeypatch, choice):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidArgumentError) as caught:
        resolve_device(choice)
    message = str(caught.value)
    assert "no CUDA GPU" in message and "--device cpu" in message and "\n" not in message


def test_a_gpu_index_beyond_the_machines_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InvalidArgumentError, match="no GPU 2: torch sees 2"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("choice", ["tpu", "gpu", "cuda:x"])
def test_unknown_devices_are_refused(choice):
    with pytest.raises(InvalidArgumentError, match="unknown device"):
        resolve_device(choice)


def test_the_command_refuses_cuda_without_a_gpu_before_writing(tmp_path, lorareg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = tmp_path / "a.safetensors"
    loralib.save(adapter(SMALL_LAYERS, 8, 4.0, seed=1), source)
    for command in (["resize", source, "--rank", "2"], ["merge", f"{source}:0.5", f"{source}:0.5", "--rank", "2"],
                    ["convert", source, "--rank", "2"]):
        output = tmp_path / "out.safetensors"
        result = lorareg(*command, "--device", "cuda", "-o", output)
        assert result.code != 0
        assert "no CUDA GPU" in result.err and len(result.err.strip().splitlines()) == 1
        assert "Traceback" not in result.err and not output.exists()


class _Transfers:
    """A stand-in for the trip to a GPU: counts what is moved and hands back a copy (a new tensor or
    module, as ``.to(device)`` would), so that the code path of a real device runs on the CPU."""

    def __init__(self) -> None:
        self.moved = 0

    def __call__(self, value, device):
        if value is None:
            return None
        self.moved += 1
        return value.to(torch.float64).to(value.dtype) if isinstance(value, torch.Tensor) else value.to(value.dtype)


@pytest.fixture
def transfers(monkeypatch):
    """Every module and tensor sent to the 'device' passes through a _Transfers (the device is cpu:0)."""
    fake = _Transfers()
    for module in ("merging", "plain", "extraction", "baking"):
        monkeypatch.setattr(f"loralib.compose.{module}.on_device", fake)
    return fake


def _same(a, b) -> None:
    assert a.modules.keys() == b.modules.keys()
    for key, module in a.modules.items():
        other = b.modules[key]
        assert module.up.device.type == "cpu" and module.down.device.type == "cpu"
        torch.testing.assert_close(module.delta(torch.float64), other.delta(torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["concat", "ties", "dare"])
def test_merge_sends_every_module_to_the_device_and_equals_the_cpu_result(transfers, method):
    inputs = [(adapter(SMALL_LAYERS, 8, 4.0, seed=1), 0.7), (adapter(SMALL_LAYERS, 4, 2.0, seed=2), -0.4)]
    options = {"rank": 6, "method": method, "density": None if method == "concat" else 0.5}
    reference = merge(inputs, **options, device="cpu").adapter
    transfers.moved = 0
    on_gpu = merge(inputs, **options, device=torch.device("cpu", 0)).adapter
    assert transfers.moved >= 2 * len(SMALL_LAYERS)  # both inputs' modules, every layer
    _same(on_gpu, reference)


def test_resize_and_lycoris_to_lora_send_every_module_to_the_device(transfers):
    source = adapter(SMALL_LAYERS, 8, 4.0, seed=3)
    reference = resize(source, rank=3, device="cpu").adapter
    transfers.moved = 0
    _same(resize(source, rank=3, device=torch.device("cpu", 0)).adapter, reference)
    assert transfers.moved == len(SMALL_LAYERS)
    lokr = random_lycoris_adapter(SMALL_LAYERS, "lokr", seed=4)
    reference = to_lora(lokr, rank=4, device="cpu").adapter
    transfers.moved = 0
    _same(to_lora(lokr, rank=4, device=torch.device("cpu", 0)).adapter, reference)
    assert transfers.moved >= len(lokr.modules)


def test_extract_and_bake_compute_on_the_device(transfers, tiny_sd1, tmp_path):
    from loralib.compose.model_weights import ModelWeights

    lora = tmp_path / "a.safetensors"
    with ModelWeights.open(tiny_sd1) as model:
        shapes = dict(list(model.shapes().items())[:6])
    layers = {k: s for k, s in shapes.items() if s.kernel_size is None or s.kernel_size == (1, 1)}
    loralib.save(adapter(layers, 2, 2.0, seed=5), lora)
    baked_cpu = bake(tiny_sd1, [(lora, 0.8)], tmp_path / "cpu", device="cpu")
    transfers.moved = 0
    baked = bake(tiny_sd1, [(lora, 0.8)], tmp_path / "dev", device=torch.device("cpu", 0))
    assert transfers.moved >= 2 * len(layers)  # each layer's module and its weight
    assert baked.layers == baked_cpu.layers
    reference = extract(tiny_sd1, tmp_path / "cpu", rank=2, device="cpu").adapter
    transfers.moved = 0
    _same(extract(tiny_sd1, tmp_path / "dev", rank=2, device=torch.device("cpu", 0)).adapter, reference)
    assert transfers.moved >= 2 * len(reference.modules)


def test_on_device_leaves_cpu_work_alone():
    tensor = torch.ones(3)
    assert on_device(tensor, torch.device("cpu")) is tensor
    assert on_device(tensor, None) is tensor
    assert on_device(None, torch.device("cpu")) is None
    assert loralib.device.workers_for(torch.device("cpu")) is None
    assert loralib.device.workers_for(torch.device("cuda")) == 1
