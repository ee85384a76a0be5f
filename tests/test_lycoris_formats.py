"""Reading and writing LyCORIS and DoRA adapters: detection, kohya-style LyCORIS keys that LyCORIS'
own loader reads back, PEFT DoRA folders that peft loads, and one-line errors for what a format
cannot hold or a file gets wrong."""

from __future__ import annotations

import json

import pytest
import torch

import loralib
from loralib.base_model import layer_shape, pipeline_layers
from loralib.errors import CorruptFileError, UnsupportedFormatError
from loralib.files.header import read_header
from loralib.formats import convert
from loralib.formats.detect import identify
from loralib.tiny_models import build_tiny_pipeline
from tests.helpers.lycoris_cases import mixed_adapter


@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd here (LyCORIS' modules copy into parameters); only inside each test, never for the process."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tiny():
    """The tiny SD1 pipeline, its adaptable layers (norms too) and their weights."""
    pipe = build_tiny_pipeline("sd1")
    layers = pipeline_layers(pipe, norms=True)
    shapes = {k: layer_shape(m) for k, m in layers.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    norms = {k: m.weight.numel() for k, m in layers.items() if k not in shapes}
    base = {k: layers[k].weight.detach().clone() for k in shapes}
    return pipe, shapes, norms, base


@pytest.fixture(scope="module")
def mixed(tiny):
    _, shapes, norms, base = tiny
    return mixed_adapter(shapes, base=base, norms=dict(list(norms.items())[:3]), architecture="sd1")


def _same_modules(a, b, exact: bool = True):
    assert set(a.modules) == set(b.modules)
    for key, module in a.modules.items():
        other = b.modules[key]
        # LyCORIS flattens conv factors, so a 1x1 conv (SD1's proj_in/out) reads back as its matrix
        flat = lambda shape: (shape[0], int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else shape  # noqa: E731
        assert other.kind == module.kind and flat(other.weight_shape) == flat(module.weight_shape), key
        assert getattr(other, "axis", None) == getattr(module, "axis", None), key
        base = torch.randn(module.weight_shape) if module.needs_base else None
        mine, theirs = module.delta(base=base), other.delta(base=base)
        assert torch.equal(mine.reshape(theirs.shape), theirs) if exact else \
            torch.allclose(mine.reshape(theirs.shape), theirs, rtol=1e-5, atol=1e-6), key
        bias = module.bias_delta()
        assert (bias is None and other.bias_delta() is None) or torch.equal(bias, other.bias_delta()), key


def test_kohya_round_trip_keeps_every_kind(mixed, tmp_path):
    assert set(mixed.kinds) == {"lora", "loha", "lokr", "full", "dora", "norm"}
    result = loralib.save(mixed, tmp_path / "mixed.safetensors")
    names = read_header(result.path).tensors
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in names
    assert any(n.endswith(".hada_t1") for n in names) and any(n.endswith(".lokr_w2") for n in names)
    assert any(n.endswith(".dora_scale") for n in names) and any(n.endswith(".w_norm") for n in names)
    back = loralib.load(result.path)
    assert back.source_format == "lycoris-lokr" or back.source_format.startswith("lycoris-")
    _same_modules(mixed, back)
    meta = read_header(result.path).metadata
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["dora_wd"] == "True"


def test_lycoris_own_loader_reads_our_files_to_the_same_weights(mixed, tiny, tmp_path):
    """LyCORIS' kohya-name loader builds its own modules from the file we wrote; their weights are ours."""
    from lycoris.modules import get_module, make_module
    from safetensors.torch import load_file

    pipe = tiny[0]
    path = loralib.save(mixed, tmp_path / "mixed.safetensors").path
    state = load_file(path)
    checked = set()
    for name, layer in pipe.unet.named_modules():
        key = f"unet.{name}"
        ours = mixed.modules.get(key)
        if ours is None or getattr(ours, "axis", "out") == "in":  # LyCORIS' loader assumes per-output DoRA
            continue
        kind, params = get_module(state, "lora_unet_" + name.replace(".", "_"))
        theirs = make_module(kind, params, "m", layer)
        weight = layer.weight.detach()
        if ours.kind == "dora":
            inner = theirs.get_weight(weight.shape) if ours.inner_kind == "lokr" else theirs.make_weight().reshape(weight.shape)
            expected = theirs.apply_weight_decompose(weight + inner * (1 if ours.inner_kind == "lokr" else theirs.scale))
            got = weight + ours.delta(base=weight)
        elif ours.kind in ("loha", "lokr"):  # get_weight applies alpha/rank once (get_diff_weight twice, in 4.1.3)
            expected, got = theirs.get_weight(weight.shape), ours.delta()
        elif ours.kind == "norm":
            expected, got = theirs.get_diff_weight()[0], ours.delta()
        else:
            expected, got = theirs.get_diff_weight()[0].reshape(weight.shape), ours.delta()
            if ours.kind == "full":
                bias = theirs.get_diff_weight()[1]
                assert (bias is None) == (ours.bias_delta() is None)
                assert bias is None or torch.allclose(bias, ours.bias_delta())
        assert torch.allclose(got, expected.reshape(got.shape), rtol=1e-5, atol=1e-6), key
        checked.add(ours.kind)
    assert checked >= {"lora", "loha", "lokr", "full", "dora"}


def test_detection_sends_plain_files_to_kohya_and_lycoris_keys_to_lycoris():
    plain = ["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
             "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", "lora_unet_mid_block_attentions_0_proj_in.alpha"]
    shapes = {n: (4, 4) for n in plain}
    assert identify(plain, shapes, {}).format == "kohya"
    dora = [*plain, "lora_unet_mid_block_attentions_0_proj_in.dora_scale"]
    assert identify(dora, {**shapes, dora[-1]: (1, 4)}, {}).format == "lycoris-dora"
    full = ["lora_unet_mid_block_attentions_0_proj_in.diff", "lora_unet_mid_block_attentions_0_proj_in.diff_b"]
    assert identify(full, {n: (4,) for n in full}, {}).format == "lycoris-full"
    oft = ["lora_unet_mid_block_attentions_0_proj_in.oft_blocks", "lora_unet_mid_block_attentions_0_proj_in.alpha"]
    kind = identify(oft, {n: (1,) for n in oft}, {})
    assert kind.format == "lycoris-oft" and "OFT" in kind.title


def test_oft_files_are_refused_in_one_line(tmp_path, lorareg):
    from safetensors.torch import save_file

    path = tmp_path / "oft.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.zeros(4, 8, 8),
               "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)}, path)
    with pytest.raises(UnsupportedFormatError, match="OFT.*recognises but cannot apply"):
        loralib.load(path)
    res = lorareg("convert", path, "--rank", "4", "-o", tmp_path / "x.safetensors")
    assert res.code == 1 and len(res.err.strip().splitlines()) == 1 and "OFT" in res.err


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
def test_formats_that_cannot_hold_a_kind_say_so(mixed, tmp_path, fmt, lorareg):
    source = loralib.save(mixed, tmp_path / "mixed.safetensors").path
    with pytest.raises(UnsupportedFormatError, match=f"the {fmt} format cannot hold.*LoHa"):
        convert(source, tmp_path / "out", fmt)
    res = lorareg("convert", source, "--to", fmt, "-o", tmp_path / "out2")
    assert res.code == 1 and len(res.err.strip().splitlines()) == 1 and "--plain" in res.err
    assert not (tmp_path / "out2").exists()


def _write(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, path)
    return path


@pytest.mark.parametrize(("tensors", "message"), [
    ({"lora_unet_conv_in.alpha": torch.tensor(1.0), "lora_unet_conv_in.hada_w1_a": torch.zeros(8, 2)},
     "lacks hada_"),
    ({"lora_unet_conv_in.hada_w1_a": torch.zeros(8, 2), "lora_unet_conv_in.hada_w1_b": torch.zeros(2, 36),
      "lora_unet_conv_in.hada_w2_a": torch.zeros(8, 2), "lora_unet_conv_in.hada_w2_b": torch.zeros(2, 36),
      "lora_unet_conv_in.lokr_w1": torch.zeros(2, 2)}, "mixes LoHa and LoKr"),
    ({"lora_unet_conv_in.lokr_w1": torch.zeros(2, 3), "lora_unet_conv_in.lokr_w2_a": torch.zeros(4, 2),
      "lora_unet_conv_in.lokr_w2_b": torch.zeros(3, 12)}, "do not multiply"),
    ({"lora_unet_conv_in.diff": torch.zeros(32, 4, 3, 3), "lora_unet_conv_in.dora_scale": torch.zeros(32, 1, 1, 1)},
     "dora_scale but no low-rank"),
    ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
      "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
      "lora_unet_mid_block_attentions_0_proj_in.dora_scale": torch.zeros(3, 1)}, "fits neither"),
])
def test_broken_lycoris_files_are_one_line_errors(tmp_path, tensors, message):
    path = _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CorruptFileError, match=message) as caught:
        loralib.load(path)
    assert "\n" not in str(caught.value)


def test_inspect_counts_kinds_and_lists_modules(mixed, tmp_path, lorareg):
    path = loralib.save(mixed, tmp_path / "mixed.safetensors").path
    report = loralib.inspect(path)
    assert report.kinds == dict(sorted(mixed.kinds.items(), key=lambda kv: -kv[1])) or report.kinds == mixed.kinds
    assert set(report.kinds) == set(mixed.kinds) and sum(report.kinds.values()) == report.modules
    assert report.module_kinds == {k: m.kind for k, m in mixed.modules.items()}
    assert not report.plain_lora and report.architecture == "sd1"
    assert any("--rank" in n for n in report.notes) and any("--base" in n for n in report.notes)
    res = lorareg("inspect", path, "--modules")
    assert res.code == 0 and "adapter kinds" in res.out and "LoHa" in res.out
    assert "unet.down_blocks.0.resnets.0.conv1" in res.out
    data = json.loads(lorareg("inspect", path, "--json").out)
    assert data["kinds"] == report.kinds and data["module_kinds"]["unet.conv_in"] == mixed.modules["unet.conv_in"].kind


def test_the_sdxl_lokr_and_sd15_loha_key_names_from_issues_are_read(key_lists, tmp_path):
    """The names quoted in public issues, with tensors of LyCORIS' shapes for those layers."""
    from loralib.base_model import full_size_layers
    from loralib.lycoris.synthetic import random_loha, random_lokr
    from loralib.naming.kohya import parse_module_name
    from loralib.naming.sgm import UNetLayout

    text = (key_lists / "issue_excerpts_PARTIAL.md").read_text()
    for arch, marker, make in (("sdxl", "lokr_w1", random_lokr), ("sd1", "hada_w1_a", random_loha)):
        layers = full_size_layers(arch)
        names = {line.rsplit(".", 1)[0] for line in text.splitlines() if line.strip().endswith(marker)}
        layout = UNetLayout.from_config(loralib.architectures.ARCHITECTURES[arch].unet_config)
        modules = {parse_module_name(name, layout): name for name in names}
        assert None not in modules and modules
        adapter = loralib.LoraAdapter({k: make(layers[k], 4, 2.0) for k in modules}, arch)
        path = loralib.save(adapter, tmp_path / f"{arch}.safetensors").path
        written = {n.rsplit(".", 1)[0] for n in read_header(path).tensors}
        assert set(names) <= written
        back = loralib.load(path)  # (the SDXL fragment adapts CLIP-L only, which SD1 shares: no architecture check)
        assert set(back.kinds) == {make.__name__.split("_")[1]} and set(back.modules) == set(modules)


def test_peft_dora_folders_read_convert_and_load_in_peft(tmp_path):
    """A DoRA adapter saved by peft is read; written back as PEFT, peft loads it to the same weights."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loralib.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "conv1"], use_dora=True,
                        init_lora_weights=False)
    model = get_peft_model(pipe.unet, config)
    model.save_pretrained(tmp_path / "dora")
    adapter = loralib.load(tmp_path / "dora")
    assert set(adapter.kinds) == {"dora"} and adapter.source_format == "peft"
    assert loralib.inspect(tmp_path / "dora").format_title.startswith("PEFT DoRA")
    base = {k: m.weight.detach().clone() for k, m in pipeline_layers(build_tiny_pipeline("sd1")).items()}
    merged = {f"unet.{n.removeprefix('base_model.model.')}": m.weight for n, m in
              get_peft_model(build_tiny_pipeline("sd1").unet, config).named_modules() if False}
    merged = {f"unet.{n}": m.weight.detach() for n, m in model.merge_and_unload().named_modules()
              if hasattr(m, "weight") and f"unet.{n}" in adapter.modules}
    for key, module in adapter.modules.items():
        assert torch.allclose(base[key] + module.delta(base=base[key]), merged[key], rtol=1e-5, atol=1e-6), key
    convert(tmp_path / "dora", tmp_path / "again", "peft")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_dora"] is True
    reloaded = PeftModel.from_pretrained(build_tiny_pipeline("sd1").unet, tmp_path / "again").merge_and_unload()
    for name, layer in reloaded.named_modules():
        if f"unet.{name}" in adapter.modules:
            assert torch.allclose(layer.weight, merged[f"unet.{name}"], rtol=1e-5, atol=1e-6), name
    convert(tmp_path / "dora", tmp_path / "dora.safetensors", "kohya")  # LyCORIS adds an epsilon to the norm
    _same_modules(adapter, loralib.load(tmp_path / "dora.safetensors"), exact=False)


def test_diffusers_files_with_diff_and_diff_b_keys_are_read(tmp_path):
    """Full-rank differences in diffusers names: a bias beside LoRA factors, a layer's weight, a norm's weight."""
    g = torch.Generator().manual_seed(3)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    tensors = {f"{q}.lora_A.weight": torch.randn(2, 32, generator=g), f"{q}.lora_B.weight": torch.randn(32, 2, generator=g),
               f"{q}.diff_b": torch.randn(32, generator=g),
               "unet.down_blocks.0.attentions.0.proj_in.diff": torch.randn(32, 32, generator=g),
               "unet.down_blocks.0.attentions.0.proj_in.diff_b": torch.randn(32, generator=g),
               "unet.down_blocks.0.resnets.0.norm1.diff": torch.randn(32, generator=g)}
    path = _write(tmp_path / "pytorch_lora_weights.safetensors", tensors)
    adapter = loralib.load(path)
    assert adapter.kinds == {"lora": 1, "full": 2} and adapter.source_format == "diffusers"
    assert torch.equal(adapter.modules[q].bias_delta(), tensors[f"{q}.diff_b"])
    assert torch.equal(adapter.modules["unet.down_blocks.0.attentions.0.proj_in"].delta(),
                       tensors["unet.down_blocks.0.attentions.0.proj_in.diff"])
    assert not adapter.modules["unet.down_blocks.0.resnets.0.norm1"].is_matrix
    assert not loralib.inspect(path).plain_lora
    with pytest.raises(UnsupportedFormatError, match="bias difference"):
        loralib.save(loralib.LoraAdapter({q: adapter.modules[q]}, "sd1"), tmp_path / "p", format="peft")
    back = loralib.load(loralib.save(adapter, tmp_path / "k.safetensors").path)  # kohya holds them all
    _same_modules(adapter, back)


def test_the_catalog_shows_the_kind(real_loras, lorareg):
    path = real_loras / "sd1_lycoris-lokr_f16.safetensors"
    assert lorareg("add", path, "--name", "falcon").code == 0
    shown = lorareg("show", "falcon")
    assert shown.code == 0 and "LyCORIS LoKr (lycoris-lokr)" in shown.out
    listed = lorareg("list", "--format", "lycoris-lokr", "--json")
    assert [e["name"] for e in json.loads(listed.out)] == ["falcon"]
