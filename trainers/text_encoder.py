"""Text-encoder adapters: layers of a ComfyUI CLIP (comfy.sd.CLIP) trained beside the diffusion model's.

A text-encoder target's path is `text_encoders.<path in clip.cond_stage_model>`, e.g.
`text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj`, so one AdapterSpec and one
weights dict hold both halves and every generic function of trainers/adapters serves them; the prefix is
what ComfyUI's own generic LoRA keys use for text encoders. The layers are installed the way the diffusion
model's are (adapters/base.py): object patches on `<path>.forward` of a clone of `clip.patcher`, so the CLIP
that came in, and every other clone of it, encode as before.

Files use kohya's keys, which ComfyUI's loader maps (comfy/lora.py model_lora_keys_clip): CLIP-L
`lora_te1_<path after clip_l.transformer.>`, CLIP-G `lora_te2_...`; T5-XXL `lora_te3_...` beside CLIP-L and
CLIP-G (SD 3.5), `lora_te2_...` beside CLIP-L alone (Flux, OneTrainer's keys).

While training, the trained encoders encode each micro-batch's captions through ComfyUI's own
`CLIP.encode_from_tokens` (so the conditioning is what the stock nodes make from the trained CLIP); the
frozen encoders' `encode_token_weights` answer from outputs computed once per caption (object patches on
the training clone as well).
"""
from __future__ import annotations

import re

import torch

from .blocks import OutOfPlaceAugmentedAssignment, TrainingBlockForward
from .cache import TextEmbedding

PREFIX = "text_encoders."
# option -> the encoders (attributes of cond_stage_model) that get adapters, where the CLIP has them
ENCODERS = {"none": (), "clip_l": ("clip_l",), "clip_l+clip_g": ("clip_l", "clip_g"),
            "all": ("clip_l", "clip_g", "t5xxl")}
_CLIP_LAYER = re.compile(r"^(clip_l|clip_g)\.transformer\.text_model\.encoder\.layers\.(\d+)\."
                         r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
# the blocks of each encoder: recomputed in backward with gradient checkpointing
_BLOCKS = {"clip_l": "clip_l.transformer.text_model.encoder.layers",
           "clip_g": "clip_g.transformer.text_model.encoder.layers", "t5xxl": "t5xxl.transformer.encoder.block"}
_T5_LAYER = re.compile(r"^t5xxl\.transformer\.encoder\.block\.\d+\.layer\.\d+\."
                       r"(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wi|wo))$")


def is_text_encoder(path: str) -> bool:
    return path.startswith(PREFIX)


def module_path(path: str) -> str:
    """The path of a text-encoder target inside clip.cond_stage_model."""
    return path[len(PREFIX):]


def target_modules(clip, option: str) -> list[tuple[str, torch.nn.Module]]:
    """(target path, layer) of the encoders `option` names that this CLIP has: CLIP's attention projections and
    MLP, T5's attention and feed-forward."""
    from .comfy_compat import is_linear
    wanted = ENCODERS[option]
    found = []
    for name, module in clip.cond_stage_model.named_modules():
        if not is_linear(module) or name.split(".", 1)[0] not in wanted:
            continue
        match = _CLIP_LAYER.match(name)
        # ComfyUI maps kohya's CLIP keys for the first 32 layers (CLIP-G has 32)
        if (match and int(match[2]) < 32) or _T5_LAYER.match(name):
            found.append((PREFIX + name, module))
    return found


def file_key(path: str, arch: str) -> str:
    """kohya's key of a text-encoder target (see the module doc)."""
    name = module_path(path)
    encoder, rest = name.split(".", 1)
    rest = rest[len("transformer."):] if rest.startswith("transformer.") else rest
    # T5 comes after the CLIPs the text encoder has, as comfy.lora numbers it: SD 3.5 3, Flux 2, Chroma (T5 alone) 1
    index = {"clip_l": 1, "clip_g": 2}.get(encoder) or {"sd3": 3, "chroma": 1}.get(arch, 2)
    return f"lora_te{index}_" + rest.replace(".", "_")


def split_layers(layers: dict) -> tuple[dict, dict]:
    """(diffusion-model layers, text-encoder layers) of one adapter's layers."""
    te = {p: layer for p, layer in layers.items() if is_text_encoder(p)}
    return {p: layer for p, layer in layers.items() if p not in te}, te


def install(clip_patcher, layers: dict) -> None:
    """Attach text-encoder layers (target path -> adapter layer) to a clone of a CLIP's ModelPatcher."""
    from .adapters.base import PatchedForward
    root = clip_patcher.model
    for path, adapter in layers.items():
        clip_patcher.add_object_patch(f"{module_path(path)}.forward",
                                      PatchedForward(root.get_submodule(module_path(path)), adapter))


def base_weights(clip):
    """path -> the layer's weight, for DoRA magnitudes of text-encoder targets."""
    from .adapters.base import base_weight
    root = clip.cond_stage_model
    return lambda path: base_weight(root.get_submodule(module_path(path)), "cpu")


def trained_encoders(layers: dict) -> set[str]:
    return {module_path(p).split(".", 1)[0] for p in layers}


class FrozenOutputs:
    """`encode_token_weights` of an encoder that does not train: its output for each distinct token list,
    computed once without gradients and handed out again."""

    def __init__(self, encoder):
        self.encode_token_weights = type(encoder).encode_token_weights.__get__(encoder)
        self.outputs: dict = {}

    @staticmethod
    def _key(pairs):
        return tuple(tuple(tuple(t.tolist() if isinstance(t, torch.Tensor) else t for t in token) for token in section)
                     for section in pairs)

    def __call__(self, token_weight_pairs):
        key = self._key(token_weight_pairs)
        out = self.outputs.get(key)
        if out is None:
            with torch.no_grad():
                out = self.encode_token_weights(token_weight_pairs)
            self.outputs[key] = out
        return out


class TextEncoderRun:
    """The CLIP of a training run: a clone with the text-encoder layers installed, whose frozen encoders answer
    from their kept outputs. `encode(captions)` gives each caption's TextEmbedding, with gradients into the
    layers. With `checkpoint`, the trained encoders' blocks are recomputed in backward (T5-XXL's 24 blocks keep
    GBs of activations otherwise)."""

    def __init__(self, clip, layers: dict, checkpoint: bool = False):
        self.clip = clip.clone()
        install(self.clip.patcher, layers)
        model = clip.cond_stage_model
        trained = trained_encoders(layers)
        for name in trained:
            blocks = model.get_submodule(_BLOCKS[name])
            for index, block in enumerate(blocks):
                # (out of place: the blocks add to their residual stream in place, see encode)
                self.clip.patcher.add_object_patch(f"{_BLOCKS[name]}.{index}.forward", TrainingBlockForward(
                    block, checkpoint=checkpoint, out_of_place=True))
        for name in ("clip_l", "clip_g", "t5xxl"):
            encoder = getattr(model, name, None)
            if encoder is not None and name not in trained and hasattr(encoder, "encode_token_weights"):
                self.clip.patcher.add_object_patch(f"{name}.encode_token_weights", FrozenOutputs(encoder))
        self.tokens: dict = {}
        self.patcher = self.clip.patcher

    def encode(self, captions) -> list[TextEmbedding]:
        out = []
        for caption in captions:
            tokens = self.tokens.get(caption)
            if tokens is None:
                tokens = self.tokens[caption] = self.clip.tokenize(caption)
            # ComfyUI's CLIP layers add to their residual stream in place (`x += ...`) after a LayerNorm saved
            # it: made out of place while gradients are on, as for Flux's blocks (trainers/blocks.py)
            with OutOfPlaceAugmentedAssignment():
                context, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            # a T5-only encoder (Chroma's) has no pooled output: an empty one, as cache_text keeps it
            out.append(TextEmbedding(context[0], pooled[0] if pooled is not None else context.new_zeros(0)))
        return out


def patched_clip(clip, layers: dict):
    """A clone of `clip` that applies text-encoder layers while loaded (for the stock encode nodes)."""
    clone = clip.clone()
    install(clone.patcher, layers)
    return clone
