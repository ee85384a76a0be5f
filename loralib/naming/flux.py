"""Flux.1's original (BFL) module names and diffusers' ``FluxTransformer2DModel`` names.

BFL names are what kohya (``lora_unet_double_blocks_0_img_attn_qkv``), ComfyUI and Forge use;
diffusers, PEFT, ai-toolkit and SimpleTuner use diffusers names. A double block's ``qkv`` is one
Linear whose rows are diffusers' ``to_q``, ``to_k``, ``to_v`` (image stream) or ``add_q_proj``,
``add_k_proj``, ``add_v_proj`` (text stream); a single block's ``linear1`` holds ``to_q``,
``to_k``, ``to_v`` and ``proj_mlp`` (four times as many rows: Flux's MLP ratio). The final
layer's ``adaLN_modulation.1`` stores shift before scale, diffusers' ``norm_out.linear`` scale
before shift. Checked in the tests against ``convert_flux_transformer_checkpoint_to_diffusers``
for every parameter of the full-size model.
"""

from __future__ import annotations

from .native import NativeMap, Rule

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


def _double(native: str, *parts: str, units: tuple[int, ...] = (1,)) -> Rule:
    return Rule(f"double_blocks.{{i}}.{native}", tuple(f"transformer_blocks.{{i}}.{p}" for p in parts), units)


def _single(native: str, *parts: str, units: tuple[int, ...] = (1,)) -> Rule:
    return Rule(f"single_blocks.{{i}}.{native}", tuple(f"single_transformer_blocks.{{i}}.{p}" for p in parts), units)


RULES: tuple[Rule, ...] = (
    _double("img_attn.qkv", *_QKV, units=(1, 1, 1)),
    _double("txt_attn.qkv", *_ADD_QKV, units=(1, 1, 1)),
    _double("img_attn.proj", "attn.to_out.0"),
    _double("txt_attn.proj", "attn.to_add_out"),
    _double("img_mlp.0", "ff.net.0.proj"),
    _double("img_mlp.2", "ff.net.2"),
    _double("txt_mlp.0", "ff_context.net.0.proj"),
    _double("txt_mlp.2", "ff_context.net.2"),
    _double("img_mod.lin", "norm1.linear"),
    _double("txt_mod.lin", "norm1_context.linear"),
    _single("linear1", *_QKV, "proj_mlp", units=(1, 1, 1, 4)),
    _single("linear2", "proj_out"),
    _single("modulation.lin", "norm.linear"),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)
FLUX_MAP = NativeMap(RULES)
# The first segment of every BFL module path (how a file's names show it is Flux).
ROOTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
