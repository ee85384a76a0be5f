"""Outside oracles for Flux.1 and SD3: the files lorareg writes fuse into the models as lorareg's ΔW says.

A random adapter over every Linear (and conv) layer of a tiny pipeline's transformer and CLIP
text encoders — q, k and v with separate factors, so the BFL/MMDiT spellings fuse them
block-diagonally — is written in every spelling lorareg writes, and:

- diffusers' own ``load_lora_weights`` + ``fuse_lora`` on ``FluxPipeline`` (kohya, ComfyUI/BFL and
  diffusers spellings) and ``StableDiffusion3Pipeline`` (diffusers spelling, the one it reads)
  must give ``W + ΔW`` for every weight. Two gaps of diffusers 0.42 on kohya/BFL Flux files: it
  splits a single block's ``linear1`` with Flux.1's full widths written into its converter (so
  it cannot load them on the 32-wide tiny model), and it drops the embedders' and the final
  layer's modules without a warning (its converter names them without ``transformer.``). Those
  layers are checked from the file's raw tensors instead: rows ``[q; k; v; mlp]`` of ``linear1``,
  the embedders under BFL's names, the final modulation with its halves swapped (BFL's
  shift/scale order, checked against diffusers' converter on the full-size model);
- SD3's kohya and ComfyUI files, which diffusers does not read: the dense ΔW computed from the
  file's raw tensors (``up @ down · alpha / rank``) in the original MMDiT layout, added to the
  original-layout weights and converted by diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``,
  must give the same weights;
- text encoders in kohya and ComfyUI names (T5 included, which diffusers drops): the file's raw
  ΔW under the model module whose name it spells;
- PEFT folders: peft's ``PeftModel.from_pretrained`` + ``merge_and_unload`` on each component.
"""

from __future__ import annotations

import re

import pytest
import torch

import loralib
from loralib.base_model import layer_shape, pipeline_layers
from loralib.layers import ATTENTION, FEED_FORWARD
from loralib.naming import internal_key
from loralib.synthetic import random_adapter
from tests.helpers.diffusers_oracle import COMPONENTS, component_weights, load_with_diffusers, pipeline_class

T5 = re.compile(r"\.encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wo))$")
# What diffusers cannot load from kohya/BFL files of a tiny Flux (see the module docstring).
DIFFUSERS_GAPS = re.compile(r"^transformer\.(single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)|"
                            r"(x_embedder|context_embedder|time_text_embed\..*|norm_out\.linear|proj_out))$")
BFL_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}


def _adapter(arch: str, base_dir, *, with_t5: bool = False, without=None, seed: int = 0):
    """A random adapter on every transformer layer and every CLIP attention/MLP layer (and T5's)."""
    pipe = pipeline_class(arch).from_pretrained(base_dir)
    layers = {}
    for key, module in pipeline_layers(pipe).items():
        if without is not None and without.match(key):
            continue
        component = key.split(".", 1)[0]
        t5 = bool(T5.search(key))
        if component == "transformer" or (t5 and with_t5) or (not t5 and (ATTENTION.search(key) or FEED_FORWARD.search(key))):
            layers[key] = layer_shape(module)
    adapter = random_adapter(layers, rank=4, seed=seed, architecture=arch)
    for i, module in enumerate(adapter.modules.values()):
        module.alpha = 2.0 if i % 2 else 4.0
    return adapter, pipe


def _expected(pipe, adapter) -> dict[str, dict[str, torch.Tensor]]:
    """Every weight of the pipeline with the adapter's ΔW (lorareg's, dense) added."""
    weights = component_weights(pipe)
    for component in adapter.components:
        for name, _ in getattr(pipe, component).named_modules():
            key = internal_key(component, name)
            if key in adapter.modules:
                weights[component][f"{name}.weight"] = weights[component][f"{name}.weight"] + adapter.modules[key].delta()
    return weights


def _max_diff(a, b) -> float:
    return max((a[c][k] - b[c][k]).abs().max().item() for c in a if c in COMPONENTS for k in a[c])


def _raw_deltas(path) -> dict[str, torch.Tensor]:
    """module name -> dense ΔW straight from a kohya/ComfyUI file's tensors (no lorareg code)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    deltas = {}
    for name in tensors:
        if name.endswith(".lora_down.weight"):
            module = name[: -len(".lora_down.weight")]
            down, up = tensors[name].double(), tensors[f"{module}.lora_up.weight"].double()
            delta = (up.flatten(1) @ down.flatten(1)) * float(tensors[f"{module}.alpha"]) / down.shape[0]
            deltas[module] = delta.reshape(up.shape[0], *down.shape[1:]).float()
    return deltas


def _text_encoder_oracle(pipe, deltas, prefixes: dict[str, str], expected, separator: str = "_") -> int:
    """Check a file's text-encoder ΔWs under the model modules whose names they spell (CLIP paths
    with ``text_model``, as every tool writes them; T5 paths as they are), joined by ``separator``."""
    checked = 0
    for component, prefix in prefixes.items():
        model = getattr(pipe, component)
        params = dict(model.named_parameters())
        by_name = {}
        for name, _ in model.named_modules():
            spelled = name if name.startswith(("text_model", "encoder.block")) else f"text_model.{name}"
            by_name[prefix + spelled.replace(".", separator)] = name
        for module, delta in deltas.items():
            if module in by_name:
                name = f"{by_name[module]}.weight"
                assert torch.allclose(params[name].detach() + delta, expected[component][name], atol=2e-6), module
                checked += 1
    return checked


@pytest.mark.parametrize("arch, spellings", [("flux", ("kohya", "comfyui", "diffusers")), ("sd3", ("diffusers",))])
def test_diffusers_loads_every_spelling_it_reads_as_our_delta(arch, spellings, request, tmp_path, one_thread):
    base_dir = request.getfixturevalue(f"tiny_{arch}")
    for fmt in spellings:
        fused_rows = fmt != "diffusers" and arch == "flux"
        adapter, pipe = _adapter(arch, base_dir, without=DIFFUSERS_GAPS if fused_rows else None)
        expected = _expected(pipe, adapter)
        out = tmp_path / f"{fmt}.safetensors"
        loralib.save(adapter, out, fmt)
        assert loralib.load(out).architecture == arch, fmt
        fused, warnings, injected, _ = load_with_diffusers(arch, base_dir, out)
        assert injected == len(adapter.modules), (fmt, injected, len(adapter.modules))
        assert _max_diff(component_weights(fused), expected) <= 2e-6, fmt
        lora_problems = [w for w in warnings if "lora" in w.lower() and ("unexpected" in w.lower() or "missing" in w.lower())]
        assert not lora_problems, (fmt, lora_problems)


@pytest.mark.parametrize("fmt, prefix, separator", [("kohya", "lora_unet_", "_"), ("comfyui", "diffusion_model.", ".")])
def test_flux_layers_diffusers_cannot_load_from_bfl_names_are_where_bfl_puts_them(tiny_flux, tmp_path, fmt, prefix,
                                                                                    separator):
    adapter, _ = _adapter("flux", tiny_flux)
    loralib.save(adapter, tmp_path / "x.safetensors", fmt)
    deltas = _raw_deltas(tmp_path / "x.safetensors")

    def stored(native: str) -> torch.Tensor:
        return deltas[prefix + native.replace(".", separator)]

    for block in range(2):
        delta = stored(f"single_blocks.{block}.linear1")
        width = delta.shape[1]
        rows = dict(zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), delta.split([width] * 3 + [4 * width])))
        for part, expected in rows.items():
            module = adapter.modules[f"transformer.single_transformer_blocks.{block}.{part}"]
            assert torch.allclose(expected, module.delta(), atol=1e-6), (block, part)
    for path, native in BFL_TOP.items():
        assert torch.allclose(stored(native), adapter.modules[f"transformer.{path}"].delta(), atol=1e-6), path
    shift_scale = stored("final_layer.adaLN_modulation.1")
    scale_shift = adapter.modules["transformer.norm_out.linear"].delta()
    assert torch.allclose(torch.cat(shift_scale.chunk(2)[::-1]), scale_shift, atol=1e-6)


def test_sd3_kohya_and_comfyui_files_convert_like_diffusers_single_file_converter(tiny_sd3, tmp_path, one_thread):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from loralib.naming.sd3 import SD3_MAP
    from tests.test_naming_families import SD3_EXTRA, original_layout

    adapter, pipe = _adapter("sd3", tiny_sd3)
    expected = _expected(pipe, adapter)
    original = original_layout(pipe.transformer, SD3_MAP, SD3_EXTRA, lambda name, value: value.detach())
    spellings = {"kohya": ("lora_unet_", "_", {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}),
                 "comfyui": ("diffusion_model.", ".", {"text_encoder": "text_encoders.clip_l.transformer.",
                                                       "text_encoder_2": "text_encoders.clip_g.transformer."})}
    for fmt, (prefix, separator, encoders) in spellings.items():
        out = tmp_path / f"{fmt}.safetensors"
        loralib.save(adapter, out, fmt)
        deltas = _raw_deltas(out)
        weights = {k.removesuffix(".weight").replace(".", separator): k for k in original if k.endswith(".weight")}
        patched = dict(original)
        for module, delta in deltas.items():
            if module.startswith(prefix):
                key = weights[module[len(prefix):]]
                patched[key] = original[key] + delta
        converted = convert_sd3_transformer_checkpoint_to_diffusers(patched)
        assert set(converted) == set(expected["transformer"])
        assert max((converted[k] - expected["transformer"][k]).abs().max().item() for k in converted) <= 2e-6, fmt
        checked = _text_encoder_oracle(pipe, deltas, encoders, expected, separator)
        assert checked == sum(1 for k in adapter.modules if k.startswith("text_encoder")), fmt
        again = loralib.load(out)  # and lorareg reads its own file back to the same modules
        assert again.architecture == "sd3" and set(again.modules) == set(adapter.modules)
        for key, module in adapter.modules.items():
            assert torch.allclose(again.modules[key].delta(), module.delta(), atol=1e-6), (fmt, key)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_peft_folders_merge_in_peft_like_our_delta(arch, request, tmp_path, one_thread):
    from peft import PeftModel

    base_dir = request.getfixturevalue(f"tiny_{arch}")
    adapter, pipe = _adapter(arch, base_dir, with_t5=True)
    assert any(".SelfAttention." in k for k in adapter.modules)
    expected = _expected(pipe, adapter)
    loralib.save(adapter, tmp_path / "peft", "peft")
    pipe = pipeline_class(arch).from_pretrained(base_dir)
    for component in adapter.components:
        folder = tmp_path / "peft" / ("" if component == "transformer" else component)
        setattr(pipe, component, PeftModel.from_pretrained(getattr(pipe, component), folder).merge_and_unload())
    assert _max_diff(component_weights(pipe), expected) <= 2e-6


@pytest.mark.parametrize("fmt, prefixes, separator", [
    ("kohya", {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}, "_"),
    ("comfyui", {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer."}, "."),
])
def test_flux_t5_is_named_where_comfyui_and_sd_scripts_look(tiny_flux, tmp_path, fmt, prefixes, separator):
    adapter, pipe = _adapter("flux", tiny_flux, with_t5=True)
    expected = _expected(pipe, adapter)
    loralib.save(adapter, tmp_path / "x.safetensors", fmt)
    deltas = _raw_deltas(tmp_path / "x.safetensors")
    checked = _text_encoder_oracle(pipe, deltas, prefixes, expected, separator)
    assert checked == sum(1 for k in adapter.modules if k.startswith("text_encoder"))
    again = loralib.load(tmp_path / "x.safetensors")
    assert set(again.modules) == set(adapter.modules)
    for key, module in adapter.modules.items():
        assert torch.allclose(again.modules[key].delta(), module.delta(), atol=1e-6), key


@pytest.mark.parametrize("arch, cls", [("flux", "FluxPipeline"), ("sd35-medium", "StableDiffusion3Pipeline")])
def test_tiny_model_command_builds_every_family(lorareg, tmp_path, arch, cls):
    import diffusers

    res = lorareg("tiny-model", tmp_path / arch, "--arch", arch)
    assert res.code == 0, res.err
    pipe = getattr(diffusers, cls).from_pretrained(tmp_path / arch)
    layers = pipeline_layers(pipe)
    assert any(".single_transformer_blocks." in k for k in layers) == (arch == "flux")
    assert any(".attn2." in k for k in layers) == (arch == "sd35-medium")
    assert any(k.startswith(("text_encoder_2.encoder.block", "text_encoder_3.encoder.block")) for k in layers)
