"""Every LyCORIS and DoRA kind's ΔW against the reference implementations: the lycoris-lora
package's own weight functions and modules, and peft's DoRA layers.

lycoris-lora 4.1.3 notes, found while writing these tests: its ``LohaModule``/``LokrModule``
``get_diff_weight`` (the merge path) multiplies by ``alpha / rank`` twice, while its functional
``diff_weight`` and its modules' ``bypass_forward_diff`` (and ComfyUI, A1111) apply it once; the
functional LoKr ``rank_scale`` reads the rank of a Tucker ``lokr_w2_a`` (stored ``[r, c]``) from the
wrong axis. The tests therefore compare with the functional code (given the scale explicitly for
Tucker LoKr) and with the modules' bypass forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loralib.adapter import LoraModule
from loralib.errors import CorruptFileError, InvalidArgumentError
from loralib.layers import LayerShape
from loralib.lycoris.kinds import DoraModule, FullModule, LohaModule, LokrModule, NormModule, dora
from loralib.lycoris.synthetic import random_loha, random_lokr
from tests.helpers.lycoris_cases import assert_close

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pip install -e '.[test]')")
from lycoris.functional import general as lyco_general  # noqa: E402
from lycoris.functional import loha as lyco_loha  # noqa: E402
from lycoris.functional import lokr as lyco_lokr  # noqa: E402

LINEAR = LayerShape(96, 64, None)
CONV = LayerShape(32, 16, (3, 3))


@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd here (LyCORIS' modules copy into parameters); only inside each test, never for the process."""
    with torch.no_grad():
        yield


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loha_oracle(m: LohaModule) -> torch.Tensor:
    scale = torch.tensor(m.alpha / m.rank)
    delta = lyco_loha.diff_weight(m.w1_b, m.w1_a, m.w2_b, m.w2_a, m.t1, m.t2, gamma=scale, backend="torch")
    return delta.reshape(m.weight_shape)


LOHA_CASES = {
    "linear": lambda: random_loha(LINEAR, 4, 2.0, generator=_g(1)),
    "linear alpha 0 means rank": lambda: random_loha(LINEAR, 4, 0.0, generator=_g(2)),
    "conv flattened": lambda: random_loha(CONV, 3, 1.5, generator=_g(3)),
    "conv tucker": lambda: random_loha(CONV, 3, 6.0, tucker=True, generator=_g(4)),
}


@pytest.mark.parametrize("case", LOHA_CASES)
def test_loha_delta_matches_lycoris_and_its_low_rank_form_is_exact(case):
    module = LOHA_CASES[case]()
    reference = _loha_oracle(module)
    assert_close(module.delta(), reference)
    up, down, coefficient = module.low_rank(torch.float64)
    assert up.shape[1] == module.exact_rank == module.w1_b.shape[0] * module.w2_b.shape[0]
    assert_close((coefficient * up @ down).reshape(module.weight_shape), reference)
    x = torch.randn(5, module.flat_shape[1], generator=_g(9))
    assert_close(module.apply(x), x @ reference.reshape(module.out_features, -1).T)


def test_loha_apply_matches_lycoris_bypass_forward():
    from lycoris.modules.loha import LohaModule as Reference

    module = random_loha(LINEAR, 4, 3.0, generator=_g(5))
    layer = nn.Linear(LINEAR.in_features, LINEAR.out_features, bias=False)
    reference = Reference.make_module_from_state_dict("m", layer, module.w1_a, module.w1_b, module.w2_a, module.w2_b,
                                                      None, None, torch.tensor(module.alpha), None)
    x = torch.randn(3, LINEAR.in_features, generator=_g(6))
    assert_close(module.apply(x), reference.bypass_forward_diff(x))


def _lokr_oracle(m: LokrModule) -> torch.Tensor:
    if m.t2 is None:
        delta = lyco_lokr.diff_weight(m.w1, m.w1_a, m.w1_b, m.w2, m.w2_a, m.w2_b, None, gamma=m.alpha, backend="torch")
    else:  # rank_scale would read the Tucker rank from the wrong axis of lokr_w2_a: give the scale
        delta = lyco_lokr.kron_weight(m.w1, m.w1_a, m.w1_b, m.w2, m.w2_a, m.w2_b, m.t2, scale=m.alpha / m.rank,
                                      backend="torch")
    return delta.reshape(m.weight_shape)


LOKR_CASES = {
    "w1 full, w2 low-rank": lambda: random_lokr(LINEAR, 2, 3.0, generator=_g(1)),
    "both decomposed": lambda: random_lokr(LayerShape(640, 320, None), 2, 1.0, factor=32, decompose_both=True,
                                           generator=_g(2)),
    "both full: alpha ignored": lambda: random_lokr(LINEAR, 2, 7.0, full=True, generator=_g(3)),
    "conv, w2 flattened": lambda: random_lokr(LayerShape(320, 320, (3, 3)), 4, 2.0, generator=_g(4)),
    "conv, w2 full 4-D": lambda: random_lokr(CONV, 4, 2.0, full=True, generator=_g(5)),
    "conv, tucker": lambda: random_lokr(LayerShape(320, 320, (3, 3)), 4, 2.0, tucker=True, generator=_g(6)),
}


@pytest.mark.parametrize("case", LOKR_CASES)
def test_lokr_delta_matches_lycoris_and_its_low_rank_form_is_exact(case):
    module = LOKR_CASES[case]()
    reference = _lokr_oracle(module)
    assert_close(module.delta(), reference)
    if case.startswith("both full"):
        assert module.scale == 1.0 and module.rank is None
    up, down, coefficient = module.low_rank(torch.float64)
    assert up.shape[1] == module.exact_rank
    assert_close((coefficient * up @ down).reshape(module.weight_shape), reference)
    x = torch.randn(4, module.flat_shape[1], generator=_g(9))
    assert_close(module.apply(x), x @ reference.reshape(module.out_features, -1).T)


def test_lokr_apply_matches_lycoris_bypass_forward():
    from lycoris.modules.lokr import LokrModule as Reference

    shape = LayerShape(64, 48, None)
    module = random_lokr(shape, 2, 3.0, generator=_g(7))
    layer = nn.Linear(shape.in_features, shape.out_features, bias=False)
    reference = Reference.make_module_from_state_dict("m", layer, module.w1, None, None, None, module.w2_a,
                                                      module.w2_b, None, None, torch.tensor(module.alpha), None)
    x = torch.randn(3, shape.in_features, generator=_g(8))
    assert_close(module.apply(x), reference.bypass_forward_diff(x))


def test_full_and_norm_differences_match_lycoris_merge():
    from lycoris.modules.full import FullModule as FullReference
    from lycoris.modules.norms import NormModule as NormReference

    layer = nn.Linear(12, 10)
    diff, diff_b = torch.randn(10, 12, generator=_g(1)), torch.randn(10, generator=_g(2))
    weight, bias = FullReference.make_module_from_state_dict("m", layer, diff, diff_b).get_merged_weight()
    module = FullModule(diff, diff_b)
    assert_close(layer.weight + module.delta(), weight)
    assert_close(layer.bias + module.bias_delta(), bias)
    norm = nn.LayerNorm(10)
    w_norm, b_norm = torch.randn(10, generator=_g(3)), torch.randn(10, generator=_g(4))
    weight, bias = NormReference.make_module_from_state_dict("n", norm, w_norm, b_norm).get_merged_weight()
    module = NormModule(w_norm, b_norm)
    assert not module.is_matrix and module.kind == "norm"
    assert_close(norm.weight + module.delta(), weight)
    assert_close(norm.bias + module.bias_delta(), bias)


@pytest.mark.parametrize("on_out", [True, False])
@pytest.mark.parametrize("inner", ["lora", "loha"])
def test_lycoris_dora_matches_weight_decompose(inner, on_out):
    g = _g(11)
    base = torch.randn(LINEAR.out_features, LINEAR.in_features, generator=g) * 0.1
    if inner == "lora":
        module = LoraModule(torch.randn(4, 64, generator=g) * 0.1, torch.randn(96, 4, generator=g) * 0.1, 2.0)
    else:
        module = random_loha(LINEAR, 4, 2.0, generator=g)
    norms = base.norm(dim=1, keepdim=True) if on_out else base.norm(dim=0, keepdim=True)
    scale = norms * (1 + 0.1 * torch.rand(norms.shape, generator=g))
    reference = lyco_general.weight_decompose(base + module.delta(), scale, 1, wd_on_out=on_out, backend="torch")
    decomposed = dora(module, scale, "lycoris")
    assert decomposed.axis == ("out" if on_out else "in") and decomposed.kind == "dora"
    assert_close(base + decomposed.delta(base=base), reference)
    x = torch.randn(3, 64, generator=g)
    assert_close(decomposed.apply(x, base), x @ (reference - base).T)
    with pytest.raises(InvalidArgumentError, match="base model"):
        decomposed.delta()


def test_lycoris_locon_dora_module_merge_matches_ours_on_a_conv():
    from lycoris.modules.locon import LoConModule

    g = _g(12)
    layer = nn.Conv2d(8, 6, 3, bias=False)
    down, up = torch.randn(3, 8, 3, 3, generator=g) * 0.2, torch.randn(6, 3, 1, 1, generator=g) * 0.2
    scale = layer.weight.reshape(6, -1).norm(dim=1).reshape(6, 1, 1, 1) * 1.1
    reference = LoConModule.make_module_from_state_dict("c", layer, up, down, None, torch.tensor(1.5), scale)
    merged, _ = reference.get_merged_weight()
    module = dora(LoraModule(down, up, 1.5), scale, "lycoris")
    assert_close(layer.weight + module.delta(base=layer.weight.detach()), merged)


@pytest.mark.parametrize("conv", [False, True])
def test_peft_dora_matches_peft_merge(conv):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3) if conv else nn.Linear(12, 10))
    reference = get_peft_model(model, LoraConfig(r=3, lora_alpha=5, target_modules=["0"], use_dora=True,
                                                 init_lora_weights=False))
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    base = state["base_model.model.0.base_layer.weight"]
    a, b = state["base_model.model.0.lora_A.default.weight"], state["base_model.model.0.lora_B.default.weight"]
    magnitude = state["base_model.model.0.lora_magnitude_vector.default.weight"] * 1.05
    reference.base_model.model[0].lora_magnitude_vector["default"].weight.copy_(magnitude)
    merged = reference.merge_and_unload()[0].weight
    module = dora(LoraModule(a, b, 5.0), magnitude, "peft")
    assert module.eps == 0 and module.axis == "out"
    assert_close(base + module.delta(base=base), merged)


def test_dora_magnitude_of_a_wrong_shape_is_a_corrupt_file():
    module = LoraModule(torch.zeros(2, 8), torch.zeros(6, 2), 2.0)
    with pytest.raises(CorruptFileError, match="fits neither"):
        dora(module, torch.ones(5, 1), "lycoris")
    assert isinstance(dora(module, torch.ones(1, 8), "lycoris"), DoraModule)


def test_inconsistent_factors_are_refused_in_one_line():
    with pytest.raises(CorruptFileError, match="do not form one module"):
        LohaModule(torch.zeros(8, 2), torch.zeros(2, 6), torch.zeros(8, 2), torch.zeros(3, 6))
    with pytest.raises(CorruptFileError, match="either lokr_w1"):
        LokrModule(w2=torch.zeros(3, 3))
    with pytest.raises(CorruptFileError, match="do not multiply"):
        LokrModule(w1=torch.zeros(2, 2), w2_a=torch.zeros(3, 2), w2_b=torch.zeros(3, 4))
    with pytest.raises(CorruptFileError, match="neither"):
        FullModule()


def test_the_real_lokr_fixture_matches_lycoris_module_by_module(real_loras):
    """Every Linear module on probe vectors against LyCORIS' Kronecker bypass (no dense matrix), and
    a sample of modules, convolutions included, densely."""
    from loralib import load

    adapter = load(real_loras / "sd1_lycoris-lokr_f16.safetensors")
    assert adapter.kinds == {"lokr": 350}
    modules = {k: m.to(torch.float32) for k, m in adapter.modules.items()}
    g = _g(13)
    for m in modules.values():
        if m.is_conv:
            continue
        x = torch.randn(2, m.in_features, generator=g)
        reference = lyco_lokr.kron_bypass(x, m.w1, m.w1_a, m.w1_b, m.w2, m.w2_a, m.w2_b, None, scale=m.scale,
                                          backend="torch")
        assert_close(m.apply(x), reference, 1e-4)
    sample = [k for i, k in enumerate(modules) if i % 25 == 0 or "resnets.0.conv1" in k]
    assert any(modules[k].is_conv for k in sample)
    for key in sample:
        m = modules[key]
        reference = _lokr_oracle(m)
        assert_close(m.delta(), reference)
        up, down, coefficient = m.low_rank(torch.float64)
        assert_close((coefficient * up @ down).reshape(m.weight_shape), reference)
