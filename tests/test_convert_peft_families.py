"""``convert --to peft`` of fused Flux.1 and SD3 files: peft's own loader gives the weights our ΔW says.

Each input is written in the original layout (kohya names of BFL / MMDiT modules, or the paths
themselves under ``diffusion_model.``) for a tiny
``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` (loralib/tiny_models.py): every Linear of
the transformer, fused layers (``qkv``, ``linear1``) with one factor pair over all their parts,
ranks and alphas varying per module (so the folder needs peft's rank and alpha patterns), and the
final modulation (and SD3's pre-only last context block) with its halves in BFL/MMDiT order.
``lorareg convert --to peft`` writes a folder; peft's ``inject_adapter_in_model`` +
``set_peft_model_state_dict`` load it into a fresh transformer (no key unexpected or missing),
and each LoRA layer's ``merge()`` must change its weight by lorareg's ΔW of the input (DoRA: the
merged weight minus the base, for this base).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import loralib
from loralib.naming.flux import FLUX_MAP
from loralib.naming.sd3 import SD3_MAP

MAPS = {"flux": FLUX_MAP, "sd3": SD3_MAP}


def _transformer(arch: str, base_dir):
    import diffusers

    cls = diffusers.FluxTransformer2DModel if arch == "flux" else diffusers.SD3Transformer2DModel
    return cls.from_pretrained(base_dir / "transformer")


def _native_layers(model, native_map) -> dict[str, tuple[int, int]]:
    """Every Linear under its original name, with the stored (fused) ``[out, in]``."""
    groups: dict[str, dict[int, tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            native, part, _ = native_map.to_native(name)
            groups.setdefault(native, {})[part] = tuple(module.weight.shape)
    return {native: (sum(s[0] for s in parts.values()), parts[0][1]) for native, parts in groups.items()}


def _fused_file(path, layers: dict[str, tuple[int, int]], kind: str):
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for i, (native, (out, inp)) in enumerate(sorted(layers.items())):
        # LoHa in the original paths as ComfyUI spells them, the others in kohya names
        name = f"diffusion_model.{native}" if kind == "loha" else "lora_unet_" + native.replace(".", "_")
        rank = 2 + i % 3
        if kind == "loha":
            for role, shape in (("hada_w1_a", (out, rank)), ("hada_w1_b", (rank, inp)), ("hada_w2_a", (out, rank)),
                                ("hada_w2_b", (rank, inp))):
                tensors[f"{name}.{role}"] = torch.randn(*shape, generator=g)
        else:
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g)
            tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g) / 10
            if kind == "dora":
                tensors[f"{name}.dora_scale"] = torch.rand(out, 1, generator=g) + 0.5
        tensors[f"{name}.alpha"] = torch.tensor(float(1 + i % 4))
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("arch", ["flux", "sd3"])
@pytest.mark.parametrize("kind", ["lora", "loha", "dora"])
def test_peft_loads_our_converted_folder_as_our_delta(arch, kind, request, tmp_path, lorareg, one_thread):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    base_dir = request.getfixturevalue(f"tiny_{arch}")
    model = _transformer(arch, base_dir)
    source = _fused_file(tmp_path / "fused.safetensors", _native_layers(model, MAPS[arch]), kind)
    adapter = loralib.load(source)
    assert adapter.architecture == arch and set(adapter.kinds) == {kind}
    res = lorareg("convert", source, "--to", "peft", *(["--plain"] if kind == "loha" else []), "-o", tmp_path / "peft")
    assert res.code == 0, res.err

    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig.from_pretrained(tmp_path / "peft")
    assert config.use_dora == (kind == "dora")
    model = inject_adapter_in_model(config, model)
    loaded = set_peft_model_state_dict(model, load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    checked = 0
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            layer.merge()
            base = before[f"{name}.weight"]
            module = adapter.modules[f"transformer.{name}"]
            ours = module.delta(base=base) if kind == "dora" else module.delta()
            change = layer.get_base_layer().weight - base
            assert float((change - ours).abs().max()) <= 2e-6 * max(float(ours.abs().max()), 1.0), name
            checked += 1
    assert checked == len(adapter.modules)
