"""SD3/SD3.5 LyCORIS and DoRA files are read in kohya and MMDiT names: fused layers split into exact parts.

Files are built from the full-size module tables (diffusers' ``SD3Transformer2DModel`` on the meta
device, its layers grouped under their MMDiT names by :data:`loralib.naming.sd3.SD3_MAP`, which
tests/test_naming_families.py checks against diffusers' own single-file converter). The oracle for
ΔW is the ``lycoris-lora`` package's weight functions (LoHa, LoKr) and peft's DoRA layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache

import pytest
import torch
from safetensors.torch import save_file

import loralib
from loralib.architectures import TRANSFORMER
from loralib.base_model import full_size_layers
from loralib.errors import LoraError
from loralib.naming.sd3 import SD3_MAP
from tests.helpers.lycoris_cases import assert_close

pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pip install -e '.[test]')")
from lycoris.functional import loha as lyco_loha
from lycoris.functional import lokr as lyco_lokr

RIGHT = 16  # LoKr right factor: 16 rows divide every SD3 part boundary (1536, 2432 and their multiples)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@cache
def native_table(arch: str) -> dict[str, tuple[int, int]]:
    """Every Linear of the full-size transformer under its MMDiT name, with the stored (fused) ``[out, in]``."""
    groups: dict[str, dict[int, tuple[int, int]]] = {}
    for key, shape in full_size_layers(arch, (TRANSFORMER,)).items():
        if shape.is_conv:
            continue
        native, part, _ = SD3_MAP.to_native(key.removeprefix(f"{TRANSFORMER}."))
        groups.setdefault(native, {})[part] = (shape.out_features, shape.in_features)
    return {native: (sum(out for out, _ in parts.values()), parts[0][1]) for native, parts in groups.items()}


@cache
def diffusers_keys(arch: str) -> frozenset[str]:
    return frozenset(k for k, s in full_size_layers(arch, (TRANSFORMER,)).items() if not s.is_conv)


def spelled(native: str, spelling: str) -> str:
    return "lora_unet_" + native.replace(".", "_") if spelling == "kohya" else f"diffusion_model.{native}"


def loha(out: int, inp: int, g: torch.Generator, rank: int = 2, alpha: float = 1.0):
    t = {"hada_w1_a": torch.randn(out, rank, generator=g), "hada_w1_b": torch.randn(rank, inp, generator=g) / 8,
         "hada_w2_a": torch.randn(out, rank, generator=g), "hada_w2_b": torch.randn(rank, inp, generator=g) / 8,
         "alpha": torch.tensor(alpha)}
    return t


def loha_dense(t) -> torch.Tensor:
    rank = t["hada_w1_b"].shape[0]
    return lyco_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None,
                                 gamma=float(t["alpha"]) / rank, backend="torch")


def lokr(out: int, inp: int, g: torch.Generator, right: int = RIGHT):
    d = 16
    return {"lokr_w1": torch.randn(out // right, inp // d, generator=g),
            "lokr_w2_a": torch.randn(right, 2, generator=g), "lokr_w2_b": torch.randn(2, d, generator=g),
            "alpha": torch.tensor(1.0)}


def lokr_dense(t) -> torch.Tensor:
    return lyco_lokr.diff_weight(t["lokr_w1"], None, None, None, t["lokr_w2_a"], t["lokr_w2_b"], None,
                                 gamma=float(t["alpha"]), backend="torch")


BUILD = {"loha": (loha, loha_dense), "lokr": (lokr, lokr_dense)}


def expected_parts(native: str, dense: torch.Tensor, width: int | None = None) -> dict[str, torch.Tensor]:
    """The dense stored ΔW's rows by diffusers key (fused parts split, swapped halves put back);
    ``width``: the layer's input width where ``dense`` is not its weight (a bias)."""
    width = width or dense.shape[1]
    target = SD3_MAP.to_target(native, (dense.shape[0], width))
    if target.swap:
        dense = torch.cat(dense.chunk(2)[::-1])
    rows = [unit * width for unit in target.units] if len(target.keys) > 1 else [dense.shape[0]]
    return dict(zip(target.keys, torch.split(dense, rows)))


def write(path, modules: dict[str, dict[str, torch.Tensor]]):
    save_file({f"{name}.{suffix}": t.contiguous() for name, tensors in modules.items() for suffix, t in tensors.items()},
              str(path))
    return path


def sample(arch: str) -> list[str]:
    """The modules whose ΔW is compared densely: block 0, the last block (pre-only context), the outer layers."""
    table = native_table(arch)
    last = max(int(n.split(".")[1]) for n in table if n.startswith("joint_blocks."))
    return [n for n in table if n.startswith(("joint_blocks.0.", f"joint_blocks.{last}.context_block.adaLN",
                                              "final_layer", "context_embedder"))]


@pytest.mark.parametrize(("arch", "kind", "spelling"), [("sd3", "loha", "kohya"), ("sd3", "lokr", "mmdit"),
                                                         ("sd35-medium", "lokr", "kohya"), ("sd35-large", "loha", "mmdit")])
def test_every_module_of_a_full_size_sd3_file_is_read_exactly(tmp_path, arch, kind, spelling):
    make, dense_of = BUILD[kind]
    g = torch.Generator().manual_seed(1)
    table = native_table(arch)
    built = {native: make(*shape, g) for native, shape in table.items()}
    file = write(tmp_path / "a.safetensors", {spelled(n, spelling): t for n, t in built.items()})
    adapter = loralib.load(file)
    assert adapter.architecture == arch
    assert set(adapter.modules) == diffusers_keys(arch) and adapter.kinds == {kind: len(diffusers_keys(arch))}
    if arch == "sd35-medium":
        assert "transformer.transformer_blocks.12.attn2.to_v" in adapter.modules
    for native in sample(arch):
        for key, rows in expected_parts(native, dense_of(built[native])).items():
            assert_close(adapter.modules[key].delta(), rows)


def test_full_differences_and_the_pre_only_modulation_split_exactly(tmp_path):
    g = torch.Generator().manual_seed(2)
    modules = {"joint_blocks.0.x_block.attn.qkv": (4608, 1536), "joint_blocks.23.context_block.adaLN_modulation.1": (3072, 1536),
               "joint_blocks.0.context_block.adaLN_modulation.1": (9216, 1536), "final_layer.adaLN_modulation.1": (3072, 1536)}
    built = {n: {"diff": torch.randn(*s, generator=g), "diff_b": torch.randn(s[0], generator=g)} for n, s in modules.items()}
    adapter = loralib.load(write(tmp_path / "full.safetensors", {spelled(n, "kohya"): t for n, t in built.items()}))
    assert adapter.architecture == "sd3" and set(adapter.kinds) == {"full"}
    for native, t in built.items():
        for (key, rows), bias in zip(expected_parts(native, t["diff"]).items(),
                                     expected_parts(native, t["diff_b"][:, None], 1536).values()):
            assert torch.equal(adapter.modules[key].delta(), rows)
            assert torch.equal(adapter.modules[key].bias_delta(), bias[:, 0])
    # the last (pre-only) block's modulation is stored shift, scale; diffusers' scale, shift
    shift, scale = built["joint_blocks.23.context_block.adaLN_modulation.1"]["diff"].chunk(2)
    assert torch.equal(adapter.modules["transformer.transformer_blocks.23.norm1_context.linear"].delta(),
                       torch.cat([scale, shift]))


def peft_dora_weight(base: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float,
                     magnitude: torch.Tensor) -> torch.Tensor:
    """The weight peft's own DoRA layer merges into a Linear of weight ``base``."""
    from peft import LoraConfig, inject_adapter_in_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(base.shape[1], base.shape[0], bias=False)

    model = One()
    model.layer.weight.copy_(base)
    config = LoraConfig(r=down.shape[0], lora_alpha=alpha, use_dora=True, target_modules=["layer"])
    model = inject_adapter_in_model(config, model)
    model.layer.lora_A["default"].weight.copy_(down)
    model.layer.lora_B["default"].weight.copy_(up)
    model.layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    model.layer.merge()
    return model.layer.base_layer.weight.detach().clone()


@pytest.mark.parametrize("spelling", ["kohya", "mmdit"])
def test_fused_sd3_dora_splits_into_parts_that_match_peft(tmp_path, spelling):
    native = "joint_blocks.0.context_block.attn.qkv"
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 1536, generator=g) / 40, torch.randn(4608, 4, generator=g) / 40
    base = torch.randn(4608, 1536, generator=g) / 40
    magnitude = base.norm(dim=1) * (1 + torch.rand(4608, generator=g) / 4)
    file = write(tmp_path / "dora.safetensors", {spelled(native, spelling): {
        "lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0), "dora_scale": magnitude[:, None]}})
    adapter = loralib.load(file)
    assert set(adapter.kinds) == {"dora"} and adapter.architecture in ("sd3", "sd35-medium")
    merged = peft_dora_weight(base, down, up, 2.0, magnitude)
    for (key, part), part_base in zip(expected_parts(native, merged - base).items(), torch.split(base, 1536)):
        assert_close(adapter.modules[key].delta(base=part_base), part, 1e-4)


def _cli_file(tmp_path, name="sample.safetensors", seed=4):
    g = torch.Generator().manual_seed(seed)
    table = native_table("sd3")
    built = {n: loha(*table[n], g) for n in sample("sd3")}
    return write(tmp_path / name, {spelled(n, "kohya"): t for n, t in built.items()}), built


def test_inspect_convert_merge_and_resize_through_the_cli(tmp_path, lorareg):
    file, built = _cli_file(tmp_path)
    expected = {k: v for n, t in built.items() for k, v in expected_parts(n, loha_dense(t)).items()}
    data = json.loads(lorareg("inspect", file, "--json").out)
    assert data["architecture"] == "sd3" and data["kinds"] == {"loha": len(expected)}

    res = lorareg("convert", file, "--plain", "--to", "kohya", "-o", tmp_path / "plain.safetensors")
    assert res.code == 0, res.err
    plain = loralib.load(tmp_path / "plain.safetensors")
    assert plain.is_plain and plain.architecture == "sd3"
    for key, rows in expected.items():
        assert_close(plain.modules[key].delta(), rows)

    res = lorareg("merge", file, f"{tmp_path / 'plain.safetensors'}:-0.25", "-o", tmp_path / "merged.safetensors")
    assert res.code == 0, res.err
    merged = loralib.load(tmp_path / "merged.safetensors")
    for key, rows in expected.items():
        assert_close(merged.modules[key].delta(), 0.75 * rows)

    res = lorareg("resize", file, "--rank", "2", "-o", tmp_path / "r2.safetensors")
    assert res.code == 0, res.err
    resized = loralib.load(tmp_path / "r2.safetensors")
    assert resized.architecture == "sd3" and max(resized.ranks) <= 2
    key = "transformer.transformer_blocks.0.ff.net.0.proj"  # an unfused layer: its best rank-2 approximation
    sigma = torch.linalg.svdvals(expected[key].double())
    error = float((resized.modules[key].delta().double() - expected[key].double()).norm())
    assert error == pytest.approx(float(sigma[2:].norm()), rel=1e-3)


@pytest.mark.parametrize(("case", "needle"), [("lokr boundary", "do not divide"), ("shape mismatch", "do not form one module")])
def test_broken_sd3_lycoris_files_are_refused_in_one_line(tmp_path, lorareg, case, needle):
    native = "joint_blocks.0.x_block.attn.qkv"
    g = torch.Generator().manual_seed(5)
    if case == "lokr boundary":
        tensors = lokr(4608, 1536, g, right=2304 // 8 * 8)  # 2304 rows do not divide the boundary at 1536
    else:
        tensors = loha(4608, 1536, g)
        tensors["hada_w2_a"] = tensors["hada_w2_a"][:4600]
    file = write(tmp_path / "bad.safetensors", {spelled(native, "kohya"): tensors})
    with pytest.raises(LoraError, match=needle) as caught:
        loralib.load(file)
    assert "\n" not in str(caught.value)
    res = lorareg("inspect", file)
    assert res.code != 0 and "Traceback" not in res.out + res.err and len(res.err.strip().splitlines()) == 1


def test_text_encoders_are_read_beside_the_transformer_and_norm_keys_are_refused(tmp_path):
    g = torch.Generator().manual_seed(6)
    encoders = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768),
                "lora_te2_text_model_encoder_layers_0_mlp_fc2": ("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", 1280),
                "lora_te3_encoder_block_0_layer_0_SelfAttention_q": ("text_encoder_3.encoder.block.0.layer.0.SelfAttention.q", 4096)}
    built = {name: loha(width, width * (4 if name.endswith("fc2") else 1), g) for name, (_, width) in encoders.items()}
    qkv = loha(4608, 1536, g)
    adapter = loralib.load(write(tmp_path / "te.safetensors", {**built, spelled("joint_blocks.0.x_block.attn.qkv", "kohya"): qkv}))
    assert adapter.architecture == "sd3" and len(adapter.modules) == 6
    for name, (key, _) in encoders.items():
        assert_close(adapter.modules[key].delta(), loha_dense(built[name]))
    # MMDiT's q/k norms are RMS norms LyCORIS does not adapt: a norm difference there names no module
    file = write(tmp_path / "norm.safetensors", {spelled("joint_blocks.0.x_block.attn.qkv", "mmdit"): qkv,
                                                 spelled("joint_blocks.0.x_block.attn.ln_q", "mmdit"): {"w_norm": torch.ones(64)}})
    with pytest.raises(LoraError, match="name no module of an SD3/SD3.5 model") as caught:
        loralib.load(file)
    assert "\n" not in str(caught.value)


INSPECT_PROBE = """
import sys
from lorareg.cli.main import main
try:
    main(["inspect", sys.argv[1], "--json"])
except SystemExit as exit:
    assert not exit.code, exit.code
print("HEAVY", sorted(m for m in ("torch", "diffusers", "peft") if m in sys.modules), file=sys.stderr)
"""


def test_inspecting_a_fused_sd3_lycoris_file_imports_no_torch(tmp_path):
    """Splitting fused layers is decided from the header alone (the core install has no torch)."""
    g = torch.Generator().manual_seed(8)
    file = write(tmp_path / "a.safetensors", {spelled("joint_blocks.0.x_block.attn.qkv", "mmdit"): lokr(4608, 1536, g),
                                              spelled("joint_blocks.0.context_block.attn.qkv", "kohya"): loha(4608, 1536, g)})
    proc = subprocess.run([sys.executable, "-c", INSPECT_PROBE, str(file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kinds"] == {"lokr": 3, "loha": 3}
    assert proc.stderr.strip().splitlines()[-1] == "HEAVY []"
