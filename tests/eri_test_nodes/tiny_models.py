"""Tiny SDXL, SD3, Flux, Chroma, Qwen-Image, Flux.2 and Z-Image models, their text encoders and a TAESD VAE
(Qwen-Image: a Wan 2.1 VAE), built with ComfyUI's own classes.

Everything here runs on the CPU in well under a second and is deterministic for a given seed. ComfyUI's
`comfy.ops.disable_weight_init` layers leave parameters as `torch.empty`, so every parameter is initialised
explicitly (std 1/sqrt(fan-in) for matrices, 1 for norm scales, 0 for biases).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.text_encoders.flux
import comfy.text_encoders.pixart_t5
import comfy.text_encoders.qwen_image
import comfy.text_encoders.sd3_clip
import comfy.text_encoders.z_image


def _comfy_compat():
    """The pack's trainers/comfy_compat.py, by its path: ComfyUI imports this test pack under another name
    than the pack, so it cannot import the pack's modules by name."""
    path = Path(__file__).resolve().parents[2] / "trainers" / "comfy_compat.py"
    spec = importlib.util.spec_from_file_location("eri_test_nodes_comfy_compat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARCHITECTURES = ("sdxl", "sdxl_v", "sd3", "flux", "flux_schnell", "chroma", "qwen_image", "flux2", "zimage")

SDXL_UNET = {
    "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": 64, "num_head_channels": 16, "adm_in_channels": 32 + 6 * 256, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# SD3's text encoder pads CLIP-L+G to T5's 4096 wide context (ComfyUI hard-codes it), so the tiny SD3 runs
# without T5, as ComfyUI allows: context (77, 4096), pooled 32 + 32.
SD3_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 64,
    "input_size": None, "pos_embed_max_size": 16, "num_patches": 256, "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [], "qk_norm": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
}
FLUX = _comfy_compat().flux_config({
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
    "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
})
FLUX_SCHNELL = {**FLUX, "guidance_embed": False}
# Chroma: Flux's blocks without their own modulation; the approximator (distilled_guidance_layer) maps
# (timestep 16 + guidance 16 + block index 32 = in_dim 64) to every block's shift / scale / gate (out_dim =
# hidden_size). in/out_channels count the 2x2 patch, as model_detection gives them (64 for 16 latent channels).
CHROMA = _comfy_compat().chroma_config({
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 64,
    "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 32,
    "n_layers": 2,
})
# Qwen-Image: its MMDiT blocks (image and text streams, joint attention), 16-channel Wan 2.1 latents with a
# time axis (B, 16, T, h, w), patched 2x2 (in_channels 64); the context is Qwen2.5-VL's hidden states (the tiny
# encoder's 64). axes_dims_rope sums to attention_head_dim.
QWEN_IMAGE = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12),
}
# Flux.2 [dev] as model_detection finds it, small: 128-channel latents (the VAE's 32 channels in 2x2 patches)
# taken one position each (patch_size 1), four rope axes (the fourth counts text positions), one modulation for
# all blocks (global_modulation), SiLU-gated MLPs, no biases, the guidance input; no pooled vector (vec_in_dim
# None). Context width = 3 x the tiny Mistral's hidden size (ComfyUI stacks three of its layers' outputs).
FLUX2 = _comfy_compat().flux2_config({
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 48,
    "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
    "ref_index_scale": 10.0,
})
# Z-Image: model_detection's Z-Image config (qk_norm, z_image_modulation, time_scale 1000, rope_theta 256, caption
# and image pad tokens every 32) at a width of 256, the least its modulation allows (the timestep embedding is
# 256 wide and the blocks' adaLN takes min(dim, 256)); heads of 32 (= sum of axes_dims); one block of each kind.
ZIMAGE = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64, "n_layers": 1,
    "n_refiner_layers": 1, "qk_norm": True, "n_heads": 8, "n_kv_heads": 8, "axes_dims": [8, 12, 12],
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 32,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}
# Text encoders small enough for CI; their widths match the tiny SDXL's context (32 + 32) and pooled (32),
# the tiny Flux's pooled (CLIP-L 32) and context (T5 64).
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
             "projection_dim": 32}
TINY_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}
# Qwen2.5-VL's language model (head_dim is fixed at 128 in ComfyUI's config; its 3D RoPE splits 64 = 16+24+24)
TINY_QWEN25 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1}
# Qwen2.5-VL's vision tower, which ComfyUI builds at 1280 wide x 32 layers (~630M parameters); text prompts never
# run it, so the tiny encoder builds it this small.
TINY_QWEN25_VISION = {"hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "num_layers": 1}
# Flux.2's Mistral 3 Small: ComfyUI takes the outputs of layers 10, 20 and 30, so 31 (tiny) layers; its head
# width (128) is fixed by ComfyUI's config class. The vocabulary is the stand-in tokenizer's (CLIP's).
TINY_MISTRAL = {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 31,
                "num_attention_heads": 1, "num_key_value_heads": 1}
# Z-Image's Qwen3-4B at the tiny Z-Image's caption width (64); ComfyUI takes its second-to-last layer
TINY_QWEN3 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
              "num_key_value_heads": 1}     # (head_dim stays 128: not a field of its config)


@torch.no_grad()
def init_parameters(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a finite, seeded value (ComfyUI's layers are created uninitialised).

    Matrices get std 1/sqrt(fan-in) rather than a flat 0.02: with 0.02 a tiny network's output barely
    depends on its inner layers, so nothing trained there could change it."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            values = torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5
        elif name.endswith("bias") or "shift" in name:
            values = torch.zeros(p.shape)
        else:
            values = torch.ones(p.shape)
        p.copy_(values.to(p.dtype))
    for name, b in module.named_buffers():
        if name.endswith("pos_embed"):   # MMDiT's position table is a buffer, created empty like the weights
            b.copy_((torch.randn(b.shape, generator=gen) * 0.1).to(b.dtype))
    return module


def _patcher(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(
        module, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device())


def tiny_model(arch: str = "sdxl", seed: int = 0, dtype: torch.dtype = torch.float32,
               compute_dtype: torch.dtype | None = None):
    """A MODEL (ModelPatcher) of the given tiny architecture: sdxl, sdxl_v (v-prediction), sd3, flux,
    flux_schnell, chroma, qwen_image, flux2 or zimage. `compute_dtype` makes ComfyUI cast weights stored in `dtype`
    to it per layer, as its loaders do for fp8 weights (weight_dtype fp8_e4m3fn)."""
    if arch in ("sdxl", "sdxl_v"):
        config = comfy.supported_models.SDXL(dict(SDXL_UNET))
        state = {"v_pred": torch.tensor([])} if arch == "sdxl_v" else {}
    elif arch == "sd3":
        config = comfy.supported_models.SD3(dict(SD3_MMDIT))
        state = {}
    elif arch == "flux":
        config = comfy.supported_models.Flux(dict(FLUX))
        state = {}
    elif arch == "flux_schnell":
        config = comfy.supported_models.FluxSchnell(dict(FLUX_SCHNELL))
        state = {}
    elif arch == "chroma":
        config = comfy.supported_models.Chroma(dict(CHROMA))
        state = {}
    elif arch == "qwen_image":
        config = comfy.supported_models.QwenImage(dict(QWEN_IMAGE))
        state = {}
    elif arch == "flux2":
        config = comfy.supported_models.Flux2(dict(FLUX2))
        state = {}
    elif arch == "zimage":
        config = comfy.supported_models.ZImage(dict(ZIMAGE))
        state = {}
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    config.set_inference_dtype(dtype, compute_dtype)
    model = config.get_model(state, "")
    init_parameters(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    model.eval()
    return _patcher(model)


# Quantized weight formats of tiny_quantized_sd3: "scaled_fp8" is the old file form (a `scaled_fp8` marker and
# a per-layer `scale_weight`; ComfyUI 0.3.75 loads it with its scaled-fp8 ops, 0.33 converts it on load to
# its quantized ops); the others are per-layer formats named in the file's `_quantization_metadata`, loaded
# as ComfyUI's MixedPrecisionOps layers holding QuantizedTensor weights.
QUANTIZED_FORMATS = ("scaled_fp8", "float8_e4m3fn", "int8_tensorwise", "nvfp4")


def quantized_formats() -> tuple[str, ...]:
    """The formats of QUANTIZED_FORMATS this ComfyUI can load (comfy/quant_ops.py's QUANT_ALGOS)."""
    import comfy.quant_ops
    algos = getattr(comfy.quant_ops, "QUANT_ALGOS", {})
    return tuple(f for f in QUANTIZED_FORMATS if f == "scaled_fp8" or f in algos)


def tiny_quantized_sd3(quant_format: str, folder: Path, seed: int = 0):
    """The tiny SD3 with every Linear weight of its blocks quantized to `quant_format`, written to a
    safetensors file in `folder` and loaded as ComfyUI's UNETLoader loads one (comfy.sd.load_diffusion_model):
    the layers are whatever ops ComfyUI picks for such a file."""
    import json
    import comfy.quant_ops
    from safetensors.torch import save_file
    source = tiny_model("sd3", seed).model.diffusion_model
    state = {k: v.detach().clone().contiguous() for k, v in source.state_dict().items()}
    linears = [name for name, m in source.named_modules() if isinstance(m, torch.nn.Linear) and "_blocks." in name]
    metadata = {}
    if quant_format == "scaled_fp8":
        for name in linears:
            weight = state[f"{name}.weight"]
            scale = weight.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
            state[f"{name}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
            state[f"{name}.scale_weight"] = scale.reshape(())
        state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    else:
        layout = comfy.quant_ops.QUANT_ALGOS[quant_format]["comfy_tensor_layout"]
        for name in linears:
            quantized = comfy.quant_ops.QuantizedTensor.from_float(state.pop(f"{name}.weight"), layout)
            if hasattr(quantized, "state_dict"):   # 0.33 (comfy-kitchen): every tensor of the format
                tensors = quantized.state_dict(f"{name}.weight")
            else:                                  # 0.3.75: fp8 data and its per-tensor scale
                tensors = {f"{name}.weight": quantized._qdata,
                           f"{name}.weight_scale": quantized._layout_params["scale"].float().reshape(())}
            state.update({k: v.contiguous() for k, v in tensors.items()})
        layers = {name: {"format": quant_format} for name in linears}
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    path = Path(folder) / f"tiny_sd3_{quant_format}.safetensors"
    save_file(state, str(path), metadata=metadata)
    return comfy.sd.load_diffusion_model(str(path))


class _TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """ComfyUI's SDXL text encoder (CLIP-L + CLIP-G) with the tiny widths of TINY_CLIP."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        model_options = {**model_options, "clip_l_model_config": dict(TINY_CLIP),
                         "clip_g_model_config": dict(TINY_CLIP)}
        super().__init__(device=device, dtype=dtype, model_options=model_options)


class _TinySD3ClipModel(comfy.text_encoders.sd3_clip.SD3ClipModel):
    """ComfyUI's SD3 text encoder: tiny CLIP-L + CLIP-G, no T5."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        model_options = {**model_options, "clip_l_model_config": dict(TINY_CLIP),
                         "clip_g_model_config": dict(TINY_CLIP)}
        super().__init__(clip_l=True, clip_g=True, t5=False, device=device, dtype=dtype,
                         model_options=model_options)


class _TinyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
    """ComfyUI's Flux text encoder: tiny CLIP-L (pooled) + tiny T5 (context)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        model_options = {**model_options, "clip_l_model_config": dict(TINY_CLIP),
                         "t5xxl_model_config": dict(TINY_T5)}
        super().__init__(dtype_t5=torch.float32, device=device, dtype=dtype, model_options=model_options)


class _TinyChromaClipModel(comfy.text_encoders.pixart_t5.PixArtT5XXL):
    """ComfyUI's Chroma (PixArt) text encoder: tiny T5 only, unpadded, no pooled output."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=torch.float32,
                         model_options={**model_options, "t5xxl_model_config": dict(TINY_T5)})


class _TinyQwenImageClipModel(comfy.text_encoders.qwen_image.QwenImageTEModel):
    """ComfyUI's Qwen-Image text encoder (Qwen2.5-VL, its chat template cut off the hidden states): tiny widths,
    its unused vision tower built small."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        import comfy.text_encoders.llama as llama
        vision = llama.qwen_vl.Qwen2VLVisionTransformer

        def small_vision(**kwargs):
            return vision(**{**kwargs, **TINY_QWEN25_VISION})
        llama.qwen_vl.Qwen2VLVisionTransformer = small_vision
        try:
            super().__init__(device=device, dtype=torch.float32,
                             model_options={**model_options, "qwen25_7b_model_config": dict(TINY_QWEN25)})
        finally:
            llama.qwen_vl.Qwen2VLVisionTransformer = vision


class _TinyMistralTokenizer(comfy.sd1_clip.SDTokenizer):
    """A stand-in for Flux.2's Mistral tokenizer (whose vocabulary comes with the 24B encoder's file): CLIP's
    vocabulary with Mistral3Tokenizer's settings (no end token, no padding to a fixed length, left padding)."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size=TINY_MISTRAL["hidden_size"], embedding_key="mistral3_24b",
                         has_end_token=False, pad_to_max_length=False, max_length=99999999, min_length=1,
                         pad_left=True, tokenizer_data=tokenizer_data)


class _TinyFlux2Tokenizer(comfy.text_encoders.flux.Flux2Tokenizer):
    """ComfyUI's Flux.2 tokenizer (the prompt inside its chat template) on the stand-in vocabulary."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        comfy.sd1_clip.SD1Tokenizer.__init__(self, embedding_directory=embedding_directory,
                                             tokenizer_data=tokenizer_data, name="mistral3_24b",
                                             tokenizer=_TinyMistralTokenizer)
        self.llama_template = "[SYSTEM_PROMPT]Describe.[/SYSTEM_PROMPT][INST]{}[/INST]"


class _TinyFlux2ClipModel(comfy.text_encoders.flux.Flux2TEModel):
    """ComfyUI's Flux.2 text encoder: a tiny Mistral 3, three of its layers' outputs side by side, no pooled
    output."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=torch.float32,
                         model_options={**model_options, "mistral3_24b_model_config": dict(TINY_MISTRAL)})


class _TinyZImageClipModel(comfy.text_encoders.z_image.ZImageTEModel):
    """ComfyUI's Z-Image text encoder: a tiny Qwen3, its second-to-last hidden state, unpadded, no pooled output."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=torch.float32,
                         model_options={**model_options, "qwen3_4b_model_config": dict(TINY_QWEN3)})


def tiny_clip(arch: str = "sdxl", seed: int = 0) -> comfy.sd.CLIP:
    """A CLIP whose `encode_from_tokens` gives the tiny model's context and pooled output: SDXL (B,77,64) and
    (B,32); SD3 (B,77,4096) and (B,64); Flux (B,256,64) and (B,32); Chroma, Qwen-Image and Z-Image (B,tokens,64)
    and none; Flux.2 (B,tokens,48) and none."""
    if arch in ("sdxl", "sdxl_v"):
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, _TinySDXLClipModel)
    elif arch == "sd3":
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                        _TinySD3ClipModel)
    elif arch in ("flux", "flux_schnell"):
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                        _TinyFluxClipModel)
    elif arch == "chroma":
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer,
                                                        _TinyChromaClipModel)
    elif arch == "qwen_image":
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.qwen_image.QwenImageTokenizer,
                                                        _TinyQwenImageClipModel)
    elif arch == "flux2":
        target = comfy.supported_models_base.ClipTarget(_TinyFlux2Tokenizer, _TinyFlux2ClipModel)
    elif arch == "zimage":
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.z_image.ZImageTokenizer,
                                                        _TinyZImageClipModel)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    init_parameters(clip.cond_stage_model, seed + 1)
    return clip


def taesd_state_dict(latent_channels: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A TAESD state dict that `comfy.sd.VAE(sd=...)` and the stock VAELoader detect as a VAE."""
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in taesd.named_parameters():
            if name in ("vae_scale", "vae_shift"):
                continue
            # Keep activations in range through TAESD's deep conv stack (Kaiming-like scale).
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in) ** 0.5 if p.ndim > 1 else torch.zeros(p.shape))
    return {k: v.detach().clone() for k, v in taesd.state_dict().items()}


def wan21_vae_state_dict(dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Wan 2.1 VAE state dict (ComfyUI's comfy.ldm.wan.vae.WanVAE, `dim` wide) that `comfy.sd.VAE(sd=...)`
    detects as one: Qwen-Image's VAE, whose latents have a time axis (an image encodes to (B, 16, 1, h, w))."""
    import comfy.ldm.wan.vae
    vae = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in) ** 0.5 if p.ndim > 1 else
                    (torch.ones(p.shape) if "gamma" in name else torch.zeros(p.shape)))
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def tiny_vae(arch: str = "sdxl", seed: int = 0) -> comfy.sd.VAE:
    """A TAESD of the architecture's latent channels (Qwen-Image: a Wan 2.1 VAE). Flux.2's VAE gives 128 channels
    (32 in 2x2 patches) at 1/16 of the size: ComfyUI 0.33's TAESD of 128 channels is Flux.2's own tiny autoencoder
    (32 channels inside, then patched), which its VAE takes as such when the file's metadata says
    `tae_latent_channels` 128; 0.3.75's is a plain TAESD of 128 channels (at 1/8)."""
    if arch == "qwen_image":
        return comfy.sd.VAE(sd=wan21_vae_state_dict(seed=seed))
    channels = {"sdxl": 4, "sdxl_v": 4, "flux2": 128}.get(arch, 16)
    metadata = {"tae_latent_channels": channels} if channels == 128 else None
    return comfy.sd.VAE(sd=taesd_state_dict(channels, seed), metadata=metadata)
