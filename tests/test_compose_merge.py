"""merge: the exact weighted sum, optimal truncation, TIES/DARE, outside oracles, real files, the CLI."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

import loralib
from loralib.base_model import LayerShape
from loralib.compose import merge
from loralib.compose.model_weights import ModelWeights
from loralib.compose.ties_dare import module_seed, task_vectors, ties
from loralib.errors import InvalidArgumentError, MismatchError, UnsupportedFormatError
from loralib.files.header import read_header
from loralib.layers import select_layers
from loralib.metadata import history
from tests.helpers.adapters import varied_adapter
from tests.helpers.compose_cases import (
    MEDIUM_LAYERS,
    SMALL_LAYERS,
    adapter,
    dense,
    optimal_error,
    relative,
    weighted_sum,
)

SD15 = ["sd15_diffusers-attnprocs_noprefix_f32", "sd15_diffusers-lora-down_unet-prefix_f32", "sd15_cloneofsimo_r4_f16"]
CONV = "unet.down_blocks.0.resnets.0.conv1"
PROJ = "unet.down_blocks.0.attentions.0.proj_in"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def _small_inputs():
    """Three inputs of different ranks, alphas and dtypes; CP-decomposed conv; modules missing from some."""
    a = adapter(SMALL_LAYERS, 4, 3.0, seed=1, mid_keys=(CONV,))
    b = adapter(SMALL_LAYERS, 8, 1.0, seed=2, skip=(TE,), dtype=torch.float64)
    c = adapter(SMALL_LAYERS, 2, 16.0, seed=3, skip=(CONV, PROJ))
    return [(a, 0.7), (b, -0.3), (c, 1.25)]


@pytest.mark.parametrize("case", ["small", "medium"])
def test_merge_is_the_exact_weighted_sum(case):
    if case == "small":
        inputs = _small_inputs()
    else:
        inputs = [(adapter(MEDIUM_LAYERS, 32, 16.0, seed=4), 0.6), (adapter(MEDIUM_LAYERS, 16, 16.0, seed=5), -0.9)]
    result = merge(inputs)
    keys = set().union(*(a.modules for a, _ in inputs))
    assert set(result.adapter.modules) == keys
    for key in keys:
        module = result.adapter.modules[key]
        assert module.alpha == module.rank  # scale 1: ΔW is the factors' product
        assert module.rank == sum(a.modules[key].rank for a, _ in inputs if key in a.modules)
        assert relative(dense(module), weighted_sum(inputs, key)) <= 1e-5, key
    assert result.adapter.modules[CONV if case == "small" else "unet.down_blocks.1.resnets.0.conv1"].is_conv
    assert result.report.max_error == 0 and result.report.retained_summary()["min"] == 1


@pytest.mark.parametrize("case,rank", [("small", 3), ("medium", 12)])
def test_merge_with_rank_is_the_best_approximation(case, rank):
    if case == "small":
        inputs = _small_inputs()
    else:
        inputs = [(adapter(MEDIUM_LAYERS, 32, 16.0, seed=6), 0.5), (adapter(MEDIUM_LAYERS, 16, 8.0, seed=7), 0.5),
                  (adapter(MEDIUM_LAYERS, 8, 8.0, seed=8), -1.0)]
    result = merge(inputs, rank=rank)
    for key, module in result.adapter.modules.items():
        target = weighted_sum(inputs, key)
        best = optimal_error(target, rank)
        error = float((dense(module) - target).norm())
        assert module.rank == rank
        assert abs(error - best) <= 1e-4 * best, key
        entry = result.report.modules[key]
        assert entry.error == pytest.approx(best / float(target.norm()), rel=1e-4)
        assert entry.retained == pytest.approx(float(dense(module).norm() / target.norm()), rel=1e-4)


def test_merge_output_keeps_the_inputs_dtype_and_records_its_operation(tmp_path):
    a = adapter(SMALL_LAYERS, 4, 2.0, seed=1, dtype=torch.float16)
    b = adapter(SMALL_LAYERS, 4, 4.0, seed=2, dtype=torch.float16)
    a_path, b_path = loralib.save(a, tmp_path / "a.safetensors").path, loralib.save(b, tmp_path / "b.safetensors").path
    result = merge([(a_path, 0.5), (b_path, 0.25)], rank=4)
    assert result.adapter.dtype == torch.float16
    saved = result.save(tmp_path / "m.safetensors")
    metadata = read_header(saved.path).metadata
    assert metadata["modelspec.merged_from"] == "a.safetensors, b.safetensors"
    record = history(metadata)[-1]
    assert record["operation"] == "merge" and record["method"] == "concat" and record["rank"] == 4
    assert [(i["file"], i["weight"]) for i in record["inputs"]] == [("a.safetensors", 0.5), ("b.safetensors", 0.25)]
    assert record["inputs"][0]["tensor_sha256"] == loralib.inspect(a_path).hashes["tensor_sha256"]
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    report = result.report
    result.drop_factors()  # what the CLI does before the catalog reads the written file
    assert result.adapter.modules == {} and result.report is report
    with pytest.raises(InvalidArgumentError, match="no modules"):
        result.save(tmp_path / "again.safetensors")


def test_peft_cat_combination_gives_the_same_delta():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(OrderedDict(lin=torch.nn.Linear(32, 40), conv=torch.nn.Conv2d(16, 24, 3)))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=3, target_modules=["lin", "conv"]), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=6, lora_alpha=2, target_modules=["lin", "conv"]))
    generator = torch.Generator().manual_seed(0)
    layers = {"lin": peft_model.base_model.model.lin, "conv": peft_model.base_model.model.conv}
    for layer in layers.values():
        for name in ("a", "b"):
            for part in (layer.lora_A[name], layer.lora_B[name]):
                part.weight.data = torch.randn(part.weight.shape, generator=generator)
    ours = []
    for name, alpha in (("a", 3.0), ("b", 2.0)):
        modules = {f"unet.{k}": loralib.LoraModule(layer.lora_A[name].weight.detach().clone(),
                                                   layer.lora_B[name].weight.detach().clone(), alpha)
                   for k, layer in layers.items()}
        ours.append(loralib.LoraAdapter(modules))
    weights = [0.7, -0.3]
    peft_model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="cat")
    result = merge(list(zip(ours, weights)))
    for key, layer in layers.items():
        expected = layer.get_delta_weight("m").detach()
        assert relative(result.adapter.modules[f"unet.{key}"].delta(), expected) <= 1e-5, key


def test_linear_method_reproduces_peft_linear_and_reports_its_error():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(OrderedDict(lin=torch.nn.Linear(20, 30)))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=4, lora_alpha=2, target_modules=["lin"]))
    layer = peft_model.base_model.model.lin
    generator = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        for part in (layer.lora_A[name], layer.lora_B[name]):
            part.weight.data = torch.randn(part.weight.shape, generator=generator)
    ours = [loralib.LoraAdapter({"unet.lin": loralib.LoraModule(layer.lora_A[n].weight.detach().clone(),
                                                                layer.lora_B[n].weight.detach().clone(), alpha)})
            for n, alpha in (("a", 8.0), ("b", 2.0))]
    weights = [0.6, -0.5]
    peft_model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="linear")
    result = merge(list(zip(ours, weights)), method="linear")
    module = result.adapter.modules["unet.lin"]
    assert relative(module.delta(), layer.get_delta_weight("m").detach()) <= 1e-5
    true_sum = weighted_sum(list(zip(ours, weights)), "unet.lin")
    assert result.report.modules["unet.lin"].error == pytest.approx(relative(dense(module), true_sum), rel=1e-6)
    assert result.report.max_error > 0.1  # factor-wise sums are not the weighted sum
    with pytest.raises(MismatchError, match="equal ranks"):
        merge([(ours[0], 1.0), (adapter({"unet.lin": LayerShape(30, 20, None)}, 2, 2.0, seed=0), 1.0)], method="linear")


def test_ties_follows_the_paper_and_matches_peft():
    from peft.utils.merge_utils import ties as peft_ties

    inputs = [(adapter(SMALL_LAYERS, 6, 3.0, seed=11), 1.0), (adapter(SMALL_LAYERS, 4, 2.0, seed=12), 1.0),
              (adapter(SMALL_LAYERS, 5, 5.0, seed=13), 1.0)]
    result = merge(inputs, method="ties", density=0.3, rank=10_000)  # full rank: the TIES result itself
    for key, module in result.adapter.modules.items():
        deltas = task_vectors([(a.modules[key], w) for a, w in inputs])
        expected = peft_ties(deltas, torch.ones(3), 0.3)
        assert relative(module.delta().reshape(expected.shape), expected) <= 1e-5, key
    # the weight multiplies ΔW before the vote: a lone negative input is its own trimmed negative
    single = merge([(inputs[0][0], -2.0)], method="ties", density=0.3, rank=10_000)
    delta = -2.0 * dense(inputs[0][0].modules[TE]).float()
    kept = delta.abs() >= delta.abs().flatten().kthvalue(delta.numel() - int(0.3 * delta.numel()) + 1).values
    assert relative(single.adapter.modules[TE].delta(), delta * kept) <= 1e-5
    assert int(kept.sum()) == int(0.3 * delta.numel())


def test_ties_elects_the_sign_of_the_weighted_sum():
    d1 = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    d2 = torch.tensor([[-1.0, -2.0], [1.0, -4.0]])
    # density 1: nothing trimmed; entry (0,0): +3 and -1 -> sign +, mean of agreeing = 3
    assert torch.equal(ties([d1, d2], 1.0), torch.tensor([[3.0, -1.5], [1.5, -4.0]]))


def test_dare_drops_and_rescales_with_a_seed():
    from peft.utils.merge_utils import prune

    inputs = [(adapter(SMALL_LAYERS, 4, 4.0, seed=21), 0.5), (adapter(SMALL_LAYERS, 4, 4.0, seed=22), 0.5)]
    result = merge(inputs, method="dare", density=0.4, seed=7, rank=10_000)
    again = merge(inputs, method="dare", density=0.4, seed=7, rank=10_000)
    other = merge(inputs, method="dare", density=0.4, seed=8, rank=10_000)
    for key, module in result.adapter.modules.items():
        expected = 0
        for position, delta in enumerate(task_vectors([(a.modules[key], w) for a, w in inputs])):
            torch.manual_seed(module_seed(7, key, position))
            expected = expected + prune(delta, 0.4, "random", rescale=True)
        assert relative(module.delta().reshape(expected.shape), expected) <= 1e-5, key
        assert torch.equal(module.delta(), again.adapter.modules[key].delta())
        assert not torch.allclose(module.delta(), other.adapter.modules[key].delta())
    # seeds depend on the module key, not on the order modules are visited in
    reordered = [(loralib.LoraAdapter(dict(reversed(a.modules.items()))), w) for a, w in inputs]
    flipped = merge(reordered, method="dare", density=0.4, seed=7, rank=10_000)
    assert all(torch.equal(m.delta(), flipped.adapter.modules[k].delta()) for k, m in result.adapter.modules.items())


def test_ties_and_dare_truncate_to_the_sum_of_ranks_by_default():
    inputs = [(adapter(MEDIUM_LAYERS, 8, 8.0, seed=31), 1.0), (adapter(MEDIUM_LAYERS, 4, 4.0, seed=32), 1.0)]
    result = merge(inputs, method="dare", density=0.5)
    assert result.report.ranks == {12: len(MEDIUM_LAYERS)}
    assert all(0 < m.retained < 1 for m in result.report.modules.values())


def test_argument_and_input_errors(real_loras):
    a = adapter(SMALL_LAYERS, 4, 4.0, seed=1)
    with pytest.raises(InvalidArgumentError, match="needs a density"):
        merge([(a, 1.0)], method="ties")
    with pytest.raises(InvalidArgumentError, match="density"):
        merge([(a, 1.0)], method="dare", density=1.5)
    with pytest.raises(InvalidArgumentError, match="applies to the ties and dare"):
        merge([(a, 1.0)], density=0.5)
    with pytest.raises(InvalidArgumentError, match="unknown merge method"):
        merge([(a, 1.0)], method="svd")
    with pytest.raises(InvalidArgumentError, match="not a number|is nan"):
        merge([(a, float("nan"))])
    with pytest.raises(InvalidArgumentError, match="every input has weight 0"):
        merge([(a, 0.0)])
    wide = adapter({TE: SMALL_LAYERS[CONV]}, 4, 4.0, seed=2)
    with pytest.raises(MismatchError, match="shape"):
        merge([(a, 1.0), (wide, 1.0)])
    with pytest.raises(UnsupportedFormatError, match="linear method sums LoRA factors.*lokr"):
        merge([(real_loras / f"{SD15[0]}.safetensors", 1.0), (real_loras / "sd1_lycoris-lokr_f16.safetensors", 1.0)],
              method="linear")


def test_real_sd15_files_merge_exactly(real_loras, tmp_path):
    inputs = [(real_loras / f"{name}.safetensors", w) for name, w in zip(SD15, (0.6, -0.4, 0.8))]
    loaded = [(loralib.load(path), w) for path, w in inputs]
    result = merge(inputs)
    assert result.adapter.architecture == "sd1"
    assert set(result.adapter.modules) == set().union(*(a.modules for a, _ in loaded))
    assert any(k.startswith("text_encoder.") for k in result.adapter.modules)  # only the cloneofsimo file has them
    saved = result.save(tmp_path / "merged.safetensors")
    reloaded = loralib.load(saved.path)
    assert reloaded.architecture == "sd1"
    # dense references are slow on the 10240 x 1280 layers: compare densely where layers are narrow,
    # and everywhere on random probes (ΔW @ X for a random X catches any difference)
    narrow = [k for k, m in reloaded.modules.items() if max(m.weight_shape) <= 320]
    assert len(narrow) >= 30
    for key in narrow:
        assert relative(dense(reloaded.modules[key]), weighted_sum(loaded, key)) <= 1e-5, key
    for key, module in reloaded.modules.items():
        probe = torch.randn(module.in_features, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        expected = sum(w * _apply(a.modules[key], probe) for a, w in loaded if key in a.modules)
        assert relative(_apply(module, probe), expected) <= 1e-5, key
    truncated = merge(inputs, rank=4)
    for key in narrow:
        target = weighted_sum(loaded, key)
        best = optimal_error(target, 4)
        error = float((dense(truncated.adapter.modules[key]) - target).norm())
        assert error <= best * (1 + 1e-4) + 1e-6 * float(target.norm()), key  # float32 round-off floor


def _apply(module, probe):
    up, down = module.factors(torch.float64)
    return module.scale * (up @ (down @ probe))


def test_real_files_of_different_architectures_are_refused(real_loras):
    with pytest.raises(MismatchError, match="Stable Diffusion 1.x.*Stable Diffusion 2.x"):
        merge([real_loras / f"{SD15[0]}.safetensors", real_loras / "sd2_diffusers-lora-down_unet-prefix_f32.safetensors"])


ORACLE_PARTS = ("unet.mid_block.", "unet.up_blocks.0.resnets.0.", "unet.down_blocks.1.attentions.0.proj_in",
                "text_encoder.text_model.encoder.layers.0.", "text_encoder_2.text_model.encoder.layers.1.")


def test_merged_file_fuses_like_diffusers_set_adapters(tiny_sdxl, tmp_path):
    """SDXL: both text encoders, SGM names, LoCon convs; a subset of layers keeps diffusers' loading quick."""
    from diffusers import StableDiffusionXLPipeline

    base, arch, pipeline_class = tiny_sdxl, "sdxl", StableDiffusionXLPipeline
    layers = {k: s for k, s in select_layers(ModelWeights.open(base).shapes(), conv=True).items()
              if k.startswith(ORACLE_PARTS)}
    assert {k.split(".")[0] for k in layers} == {"unet", "text_encoder", "text_encoder_2"}
    a = varied_adapter(layers, architecture=arch, seed=1, rank=4, conv_rank=2)
    b = varied_adapter(layers, architecture=arch, seed=2, rank=6, conv_rank=3)
    # inputs in diffusers' own format: diffusers misreads kohya files whose alphas vary per module
    paths = [loralib.save(a, tmp_path / "a.safetensors", "diffusers").path,
             loralib.save(b, tmp_path / "b.safetensors", "diffusers").path]
    weights = [0.7, -0.3]
    merged = merge(list(zip(paths, weights))).save(tmp_path / "merged.safetensors").path

    def fused(files, names, scales):
        pipe = pipeline_class.from_pretrained(base)
        for file, name in zip(files, names):
            pipe.load_lora_weights(str(file), adapter_name=name)
        pipe.set_adapters(names, scales)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
                for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}

    expected = fused(paths, ["a", "b"], weights)
    actual = fused([merged], ["m"], [1.0])
    for component, tensors in expected.items():
        assert set(actual[component]) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.allclose(actual[component][name], tensor, atol=2e-6, rtol=0), name
    with ModelWeights.open(base) as original:  # the LoRAs did change the weights
        changed = [k for k in layers if k.startswith("unet.")
                   and not torch.equal(expected["unet"][k[5:] + ".weight"], original.read(k))]
    assert len(changed) == sum(1 for k in layers if k.startswith("unet."))


# --- the CLI -------------------------------------------------------------------------------------

@pytest.fixture
def two_files(tmp_path):
    a = loralib.save(adapter(SMALL_LAYERS, 4, 2.0, seed=1), tmp_path / "a.safetensors").path
    b = loralib.save(adapter(SMALL_LAYERS, 6, 3.0, seed=2), tmp_path / "b.safetensors").path
    return a, b


def test_cli_merge_with_rank_and_json(lorareg, two_files, tmp_path):
    a, b = two_files
    out = tmp_path / "ab.safetensors"
    res = lorareg("merge", f"{a}:0.7", f"{b}:-0.3", "--rank", "3", "-o", out, "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["output"] == str(out) and data["format"] == "kohya"
    assert data["report"]["ranks"] == {"3": len(SMALL_LAYERS)}
    assert 0 < data["report"]["retained"]["min"] <= data["report"]["retained"]["max"] <= 1
    loaded = [(loralib.load(a), 0.7), (loralib.load(b), -0.3)]
    merged = loralib.load(out)
    for key, module in merged.modules.items():
        target = weighted_sum(loaded, key)
        assert float((dense(module) - target).norm()) <= optimal_error(target, 3) * (1 + 1e-4), key
    res = lorareg("merge", a, f"{b}:0.5", "-o", tmp_path / "plain.safetensors", "--to", "peft")
    assert res.code == 0, res.err
    assert "retained energy" in res.out and "exact" in res.out


def test_cli_weight_syntax(lorareg, two_files, tmp_path):
    a, b = two_files
    odd = tmp_path / "odd:name.safetensors"  # a path with a colon, given whole: weight 1
    odd.write_bytes(a.read_bytes())
    res = lorareg("merge", odd, f"{b}:2e-1", "-o", tmp_path / "o.safetensors", "--json")
    assert res.code == 0, res.err
    record = history(read_header(tmp_path / "o.safetensors").metadata)[-1]
    assert [i["weight"] for i in record["inputs"]] == [1.0, 0.2]
    for bad in (f"{a}:abc", f"{a}:", f"{a}:0.5x"):
        res = lorareg("merge", bad, "-o", tmp_path / "bad.safetensors")
        assert res.code == 1 and "cannot read the weight" in res.err, bad
        assert "Traceback" not in res.err
    res = lorareg("merge", "C:\\loras\\missing.safetensors", "-o", tmp_path / "bad.safetensors")
    assert res.code == 1 and "C:\\loras\\missing.safetensors is not a file" in res.err  # a path, not a weight
    res = lorareg("merge", f"{tmp_path / 'missing.safetensors'}:0.5", "-o", tmp_path / "bad.safetensors")
    assert res.code == 1 and f"{tmp_path / 'missing.safetensors'} is not a file" in res.err
    assert not (tmp_path / "bad.safetensors").exists()


def test_cli_refuses_without_writing(lorareg, two_files, tmp_path, real_loras):
    a, b = two_files
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    res = lorareg("merge", f"{a}:0.5", f"{b}:0.5", "-o", out)
    assert res.code == 1 and "already exists" in res.err and "--force" in res.err
    assert out.read_bytes() == b"keep me"
    res = lorareg("merge", f"{a}:0.5", f"{b}:0.5", "-o", out, "--force")
    assert res.code == 0 and loralib.load(out).modules
    cross = tmp_path / "cross.safetensors"
    res = lorareg("merge", real_loras / f"{SD15[0]}.safetensors",
                  f"{real_loras / 'sd2_diffusers-attnprocs_unet-prefix_f32.safetensors'}:0.5", "-o", cross)
    assert res.code == 1 and "cannot be combined" in res.err and not cross.exists()
    res = lorareg("merge", f"{a}:0.5", f"{b}:0.5", "--method", "ties", "-o", cross)
    assert res.code == 1 and "needs a density" in res.err and not cross.exists()
    res = lorareg("merge", real_loras / "sd1_lycoris-lokr_f16.safetensors", a, "--method", "linear", "-o", cross)
    assert res.code == 1 and "lokr" in res.err and not cross.exists()
    assert list(tmp_path.glob("*.partial")) == []


def test_nonfinite_values_are_found_as_modules_are_computed_and_named_per_input(tmp_path):
    from loralib.compose import resize
    from loralib.errors import CorruptFileError

    good, bad = adapter(SMALL_LAYERS, 4, 2.0, seed=1), adapter(SMALL_LAYERS, 4, 2.0, seed=2)
    keys = list(bad.modules)
    for key, value in ((keys[-1], float("nan")), (keys[0], float("inf"))):
        bad.modules[key].down[0, 0] = value
    loralib.save(good, tmp_path / "good.safetensors")
    loralib.save(bad, tmp_path / "bad.safetensors", allow_nonfinite=True)
    in_file = [key for key in loralib.load(tmp_path / "bad.safetensors").modules if key in (keys[0], keys[-1])]
    listed = f"bad.safetensors holds NaN or infinite values in 2 module(s): {', '.join(in_file)}"  # the file's order
    for weights in ((1.0, 0.5), (1.0, 0.0)):  # an input of weight 0 is refused too
        with pytest.raises(CorruptFileError) as caught:
            merge([(tmp_path / "good.safetensors", weights[0]), (tmp_path / "bad.safetensors", weights[1])], 2)
        assert str(caught.value).startswith(listed)
    with pytest.raises(CorruptFileError) as caught:
        resize(tmp_path / "bad.safetensors", 2)
    assert str(caught.value).startswith(listed)
    assert merge([tmp_path / "good.safetensors", tmp_path / "good.safetensors"], 2).adapter.modules  # and clean inputs pass
