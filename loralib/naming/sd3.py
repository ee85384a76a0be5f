"""SD3/SD3.5's original (MMDiT, Stability AI) module names and diffusers' ``SD3Transformer2DModel`` names.

kohya (``lora_unet_joint_blocks_0_x_block_attn_qkv``) and ComfyUI use MMDiT names; diffusers,
PEFT and SimpleTuner use diffusers names. Each joint block has an image stream (``x_block``)
and a text stream (``context_block``) whose attention ``qkv`` is one Linear holding diffusers'
``to_q``/``to_k``/``to_v`` (resp. ``add_q_proj``/``add_k_proj``/``add_v_proj``); SD3.5 Medium adds
``x_block.attn2``. The last block's context stream only projects (``pre_only``): its
``adaLN_modulation.1`` is twice as wide as its input, not six times, and like the final layer's
it stores shift before scale, diffusers scale before shift. Checked in the tests against
``convert_sd3_transformer_checkpoint_to_diffusers`` for every parameter of the full-size models.
"""

from __future__ import annotations

from .native import NativeMap, Rule


def _block(native: str, *parts: str, units: tuple[int, ...] = (1,), swap_when_narrow: bool = False) -> Rule:
    return Rule(f"joint_blocks.{{i}}.{native}", tuple(f"transformer_blocks.{{i}}.{p}" for p in parts), units,
                swap_when_narrow=swap_when_narrow)


RULES: tuple[Rule, ...] = (
    _block("x_block.attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v", units=(1, 1, 1)),
    _block("x_block.attn.proj", "attn.to_out.0"),
    _block("x_block.attn2.qkv", "attn2.to_q", "attn2.to_k", "attn2.to_v", units=(1, 1, 1)),
    _block("x_block.attn2.proj", "attn2.to_out.0"),
    _block("x_block.mlp.fc1", "ff.net.0.proj"),
    _block("x_block.mlp.fc2", "ff.net.2"),
    _block("x_block.adaLN_modulation.1", "norm1.linear"),
    _block("context_block.attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", units=(1, 1, 1)),
    _block("context_block.attn.proj", "attn.to_add_out"),
    _block("context_block.mlp.fc1", "ff_context.net.0.proj"),
    _block("context_block.mlp.fc2", "ff_context.net.2"),
    _block("context_block.adaLN_modulation.1", "norm1_context.linear", swap_when_narrow=True),
    Rule("x_embedder.proj", ("pos_embed.proj",)),
    Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Rule("context_embedder", ("context_embedder",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)
SD3_MAP = NativeMap(RULES)
ROOTS = ("joint_blocks", "x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer")
