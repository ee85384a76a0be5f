"""Outside oracles: diffusers and peft load the files lorareg writes and fuse the same weights.

Originals come from other tools: a LoRA written by diffusers itself (peft layers on the tiny
pipelines, saved with ``save_lora_weights``), and the real published files in the fixtures,
which diffusers loads into full-size UNets (built on the meta device, weights zeroed where
the adapter applies, so the fused weight is exactly diffusers' ΔW).
"""

from __future__ import annotations

import pytest
import torch

import loralib
from loralib.architectures import ARCHITECTURES
from loralib.base_model import pipeline_layers
from loralib.formats import convert
from loralib.naming import internal_key
from tests.helpers.diffusers_oracle import COMPONENTS, component_weights, load_with_diffusers, pipeline_class

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj", "conv_shortcut"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _fuse_with_diffusers(arch, base_dir, lora_file):
    """Fused weights, warnings and the number of injected LoRA layers after diffusers loads ``lora_file``."""
    pipe, warnings, injected, _ = load_with_diffusers(arch, base_dir, lora_file)
    return component_weights(pipe), warnings, injected


def _diffusers_written_lora(arch, base_dir, path, *, legacy_spelling=False, unet_alpha_pattern=None,
                            text_alpha_pattern=None):
    """A LoRA made and saved by diffusers + peft themselves, with varied ranks and alphas.

    ``legacy_spelling`` converts the keys with ``convert_state_dict_to_diffusers`` first, as the
    diffusers training examples do. Returns the file and the live model's ΔW of every module
    (``scaling · B @ A``, as peft applied it while the adapter was made).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline_class(arch).from_pretrained(base_dir)
    torch.manual_seed(3)
    layers = {}
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS, init_lora_weights=False,
                             rank_pattern={"conv1": 2}, alpha_pattern=unet_alpha_pattern or {"conv2": 1.5})
    pipe.unet.add_adapter(unet_config)
    unet_state = get_peft_model_state_dict(pipe.unet)
    layers["unet_lora_layers"] = convert_state_dict_to_diffusers(unet_state) if legacy_spelling else unet_state
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict()}
    for component in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is not None:
            config = LoraConfig(r=3, lora_alpha=6, target_modules=TEXT_TARGETS, init_lora_weights=False,
                                alpha_pattern=text_alpha_pattern or {})
            model.add_adapter(config)
            layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
            metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    pipeline_class(arch).save_lora_weights(path.parent, weight_name=path.name, **layers, **metadata)
    live = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        for name, module in model.named_modules() if model is not None else ():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a = module.lora_A["default"].weight.detach().flatten(1)
                b = module.lora_B["default"].weight.detach().flatten(1)
                key = internal_key(component, name)
                live[key] = (module.scaling["default"] * b @ a).reshape(module.base_layer.weight.shape)
    return path, live


def _max_diff(a, b) -> float:
    return max((a[c][k] - b[c][k]).abs().max().item() for c in a for k in a[c])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_files_we_convert_fuse_like_the_diffusers_original(arch, request, tmp_path):
    base_dir = request.getfixturevalue(f"tiny_{arch}")
    original, live = _diffusers_written_lora(arch, base_dir, tmp_path / "original.safetensors")
    adapter = loralib.load(original)
    assert adapter.source_format == "diffusers" and adapter.architecture == arch
    assert len({m.alpha for m in adapter.modules.values()}) > 2  # the patterns were understood
    expected, _, injected = _fuse_with_diffusers(arch, base_dir, original)
    assert injected == len(live) == len(adapter.modules)

    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        convert(original, out, fmt)
        fused, warnings, injected = _fuse_with_diffusers(arch, base_dir, out)
        assert _max_diff(fused, expected) <= 1e-6, fmt
        assert injected == len(adapter.modules), fmt
        # transformers also prints a load report listing the base weights as absent from the adapter
        # checkpoint; only LoRA keys reported missing or unexpected would be a problem
        lora_problems = [w for w in warnings if "lora" in w.lower() and ("unexpected" in w.lower() or "missing" in w.lower())]
        assert not lora_problems, lora_problems

    # PEFT output: peft itself is the oracle (diffusers does not read PEFT folders)
    from peft import PeftModel

    convert(original, tmp_path / "peft", "peft")
    pipe = pipeline_class(arch).from_pretrained(base_dir)
    for component in adapter.components:
        folder = tmp_path / "peft" / ("" if component == "unet" else component)
        merged = PeftModel.from_pretrained(getattr(pipe, component), folder).merge_and_unload()
        setattr(pipe, component, merged)
    assert _max_diff(component_weights(pipe), expected) <= 1e-6


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_we_read_the_alphas_the_trained_model_used(arch, request, tmp_path):
    """Against the live peft model that made the file, in the spelling of diffusers' training
    scripts and with alpha patterns on attention and text-encoder modules.

    diffusers 0.42 itself reloads such a file incompletely (with transformers 5 it ignores the
    text-encoder patterns, and legacy-spelled attention modules are skipped next to the metadata),
    and its kohya loader applies one alpha to every attention projection. lorareg reads what the
    model was trained with, and its diffusers-format output loads in diffusers exactly.
    """
    base_dir = request.getfixturevalue(f"tiny_{arch}")
    original, live = _diffusers_written_lora(arch, base_dir, tmp_path / "original.safetensors", legacy_spelling=True,
                                             unet_alpha_pattern={"to_k": 5, "conv2": 1.5}, text_alpha_pattern={"fc2": 1})
    adapter = loralib.load(original)
    assert set(adapter.modules) == set(live)
    for key, module in adapter.modules.items():
        assert torch.allclose(module.delta(), live[key], atol=1e-6, rtol=0), key
    convert(original, tmp_path / "d.safetensors", "diffusers")
    fused, _, injected = _fuse_with_diffusers(arch, base_dir, tmp_path / "d.safetensors")
    assert injected == len(live)
    pipe = pipeline_class(arch).from_pretrained(base_dir)
    names = {id(m): (c, n) for c in COMPONENTS if getattr(pipe, c, None) is not None
             for n, m in getattr(pipe, c).named_modules()}
    for key, module in pipeline_layers(pipe).items():
        if key in live:
            component, name = names[id(module)]
            change = fused[component][f"{name}.weight"] - module.weight.detach()
            assert torch.allclose(change, live[key], atol=1e-6, rtol=0), key


REAL_FILES = {
    "sd1": ["sd15_diffusers-attnprocs_noprefix_f32", "sd15_diffusers-attnprocs_unet-prefix_f32",
            "sd15_diffusers-lora-down_unet-prefix_f32"],
    "sd2": ["sd2_diffusers-attnprocs_unet-prefix_f32", "sd2_diffusers-lora-down_unet-prefix_f32",
            "sd2_diffusers-lora-down_unet-prefix_bf16"],
}


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_real_files_read_as_diffusers_reads_them_full_size(arch, real_loras, tmp_path):
    """diffusers loads each real file (and our kohya conversion of it) into a full-size UNet; the
    factors and scale of every layer it injects must be the ones we read (so ΔW is the same)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES[arch].unet_config)
    unet = unet.to_empty(device="cpu")  # weights are irrelevant: only the injected layers are read

    def diffusers_factors(path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        # pipe.load_lora_weights only looks under "unet." (so in diffusers 0.42 it loads nothing from
        # attention-processor files saved without the prefix); ask the UNet directly with the right prefix
        prefix = "unet" if all(k.startswith("unet.") for k in state_dict) else None
        unet.load_lora_adapter(state_dict, network_alphas=alphas, prefix=prefix, adapter_name="x")
        factors = {name: (module.lora_A["x"].weight.detach().clone(), module.lora_B["x"].weight.detach().clone(),
                          module.scaling["x"])
                   for name, module in unet.named_modules() if hasattr(module, "lora_A") and "x" in module.lora_A}
        unet.delete_adapters("x")
        return factors

    for stem in REAL_FILES[arch]:
        source = real_loras / f"{stem}.safetensors"
        adapter = loralib.load(source)
        assert adapter.architecture == arch
        reference = diffusers_factors(source)
        convert(source, tmp_path / f"{stem}.safetensors", "kohya")
        ours_in_diffusers = diffusers_factors(tmp_path / f"{stem}.safetensors")
        assert set(reference) == set(ours_in_diffusers) == {k.split(".", 1)[1] for k in adapter.modules}, stem
        for key, module in adapter.modules.items():
            down, up, scale = reference[key.split(".", 1)[1]]
            assert torch.equal(down, module.down.float()) and torch.equal(up, module.up.float()), (stem, key)
            assert scale == pytest.approx(module.scale, rel=1e-7), (stem, key)
            again = ours_in_diffusers[key.split(".", 1)[1]]
            assert torch.equal(again[0], down) and torch.equal(again[1], up) and again[2] == scale, (stem, key)
