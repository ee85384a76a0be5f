"""Module names: lorareg's internal keys, kohya's flattened names and Stability's SGM block names.

Inside lorareg every adapted module is keyed ``<component>.<module path>``, where the component
is ``unet``, ``text_encoder`` or ``text_encoder_2`` and the path is the module's dotted path in
the diffusers/transformers model. Text-encoder paths always start with ``text_model.`` (the
spelling every LoRA tool writes, whether or not the installed transformers nests its CLIP
model that way).
"""
