"""The per-architecture questions the training loop asks. The loop never branches on an architecture name."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..comfy_compat import is_linear, pinned_memory_disabled
from ..config import TrainingSettings, quoted


@dataclass
class Batch:
    """One micro-batch, on the training device, already in the model's latent space."""
    latents: torch.Tensor             # x0, (B, C, h, w), scaled by the architecture's latent format
    contexts: list                    # TextEmbedding per sample (after caption dropout)
    items: list                       # DatasetItem per sample
    # edit pairs: the control images' latents, scaled as `latents` (B, C, h, w), given to the model as reference
    # latents (Flux Kontext, trainers/arch/flux_kontext.py); None without control images
    controls: torch.Tensor | None = None


class Architecture:
    name: str = ""
    presets: tuple[str, ...] = ("attention", "attention_mlp", "all_linear")
    # True when the model's blocks update tensors in place in a way autograd cannot differentiate
    # (see trainers/blocks.py); their forwards then run with augmented assignments made out of place.
    out_of_place_blocks: bool = False
    # True when the model hands its blocks a residual stream in a transposed memory layout: training copies it
    # once into a contiguous tensor before each block (trainers/blocks.py), the same values
    contiguous_block_inputs: bool = False
    # True when the conditioning's `guidance` is an embedded-guidance input the samples should get (Flux-dev):
    # other models ignore it, or (Chroma) take ComfyUI's default unless a workflow sets one
    embedded_guidance: bool = False
    # Why Create adapter's text_encoder is refused on this architecture ("" where it is offered)
    text_encoder_refusal: str = ""
    # memory_budget_gb's estimate of a checkpointed training step's activations: ComfyUI's estimate for inference
    # (BaseModel.memory_required, read as on an NVIDIA GPU) times this. Measured on an H200 at 1024², batch 1,
    # LoRA r16, the whole run's peak less the weights (CUDA graphs' capture included): SDXL 1.93 GiB (ComfyUI's
    # estimate 0.26 GiB: x7.5); Z-Image 3.6, Qwen-Image 5.4 GiB. SD 3.5 and Flux say their own
    activation_factor: float = 8
    # True when the model takes reference latents (edit pairs: control images, trainers/arch/flux_kontext.py)
    reference_latents: bool = False

    def matches(self, base_model) -> bool:
        raise NotImplementedError

    # preset -> patterns of the Linear layers' paths it adapts (re.search)
    preset_rules: dict[str, tuple] = {}

    def target_modules(self, diffusion_model: torch.nn.Module, preset: str) -> list[tuple[str, torch.nn.Module]]:
        if preset not in self.preset_rules:
            raise ValueError(f"target preset {quoted(preset)} is not one of {', '.join(self.presets)}")
        rules = self.preset_rules[preset]
        return linear_modules(diffusion_model, lambda name: any(rule.search(name) for rule in rules))

    def conv_modules(self, diffusion_model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """The convolutions LoCon-style adapters may adapt (conv_layers); DiTs have none."""
        return []

    def unused_settings(self, base_model) -> dict[str, str]:
        """Training settings of this architecture that this model cannot use: name -> why (see
        config.ignored_settings; what no model of an architecture uses is in the setting's own `archs`)."""
        return {}

    def block_modules(self, diffusion_model: torch.nn.Module) -> list[str]:
        """Paths of the modules recomputed in backward when checkpointing is on (the model's blocks)."""
        raise NotImplementedError

    def fused_forwards(self, diffusion_model: torch.nn.Module) -> dict[str, object]:
        """Module path -> a faster `forward` with the same math (trainers/fused.py), patched in while training
        on a GPU."""
        return {}

    def training_block_forward(self, block: torch.nn.Module):
        """A faster forward for one of `block_modules` while training on a GPU, with the same math and bits
        (`f(block, *args, **kwargs)`; trainers/blocks.py runs it, recomputed under checkpointing like the
        block's own), or None: the block's own forward."""
        return None

    def sample_sigmas(self, model_sampling, batch: Batch, generator: torch.Generator,
                      settings: TrainingSettings) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, model_sampling, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def conditioning(self, base_model, batch: Batch, settings: TrainingSettings,
                     device: torch.device) -> dict[str, torch.Tensor]:
        """The model's inputs besides the noisy latent and timestep, for `batch`, on `device` in the model's
        dtype. Host-side work (stacking captions, size embeddings) happens here, so that `predict_from`
        runs only device work: the training step can then be replayed as a CUDA graph."""
        raise NotImplementedError

    def predict_from(self, base_model, model_sampling, x_noisy: torch.Tensor, sigma: torch.Tensor,
                     conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's prediction from tensors already on the device (no host work, no host syncs)."""
        xc = model_sampling.calculate_input(sigma.view(-1, *[1] * (x_noisy.ndim - 1)), x_noisy)
        timestep = model_sampling.timestep(sigma).float()
        return base_model.diffusion_model(xc.to(compute_dtype(base_model)), timestep, transformer_options={},
                                          **conditioning)

    def predict(self, base_model, model_sampling, x_noisy: torch.Tensor, sigma: torch.Tensor, batch: Batch,
                settings: TrainingSettings) -> torch.Tensor:
        return self.predict_from(base_model, model_sampling, x_noisy, sigma,
                                 self.conditioning(base_model, batch, settings, x_noisy.device))

    def target(self, model_sampling, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, model_sampling, sigma: torch.Tensor, settings: TrainingSettings) -> torch.Tensor:
        return torch.ones_like(sigma)

    def noise_levels(self, model_sampling, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(share, noise ratio) per sample, for the Huber loss's threshold schedule (trainers/losses.py): the
        timestep as a share of the noise schedule (0 clean .. 1 pure noise) and the noisy latent's
        noise-to-signal ratio. Device work only."""
        raise NotImplementedError


def linear_modules(root: torch.nn.Module, keep) -> list[tuple[str, torch.nn.Module]]:
    """The linear layers whose path `keep` accepts, quantized ones (ComfyUI's MixedPrecisionOps) included."""
    return [(name, m) for name, m in root.named_modules() if is_linear(m) and keep(name)]


def compute_dtype(base_model) -> torch.dtype:
    """The dtype ComfyUI runs the model in: its manual-cast dtype when the weights are stored in another
    (fp8 weights compute in bf16), else the weights' dtype."""
    return base_model.manual_cast_dtype or base_model.get_dtype()


def latents_in(base_model, latents: torch.Tensor) -> torch.Tensor:
    """Cached VAE latents (B, C, h, w) in the model's latent space (its latent format's process_in), as training
    uses them: (B, C, h, w). A latent format with a time axis (Qwen-Image's Wan 2.1: latent_dimensions 3) scales
    (B, C, T, h, w); an image is one frame, which training drops (the architecture puts it back for its model)."""
    if getattr(base_model.latent_format, "latent_dimensions", 2) != 3:
        return base_model.latent_format.process_in(latents)
    frames = latents if latents.ndim == 5 else latents.unsqueeze(2)
    if frames.shape[2] != 1:
        raise ValueError(f"a latent of {frames.shape[2]} frames: EriDiffusion trains on images (one frame each)")
    return base_model.latent_format.process_in(frames).squeeze(2)


def to_device(tensor: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` (as `dtype`) on `device`. From CPU memory to a GPU it goes through pinned memory without the host
    waiting: a plain copy from pageable memory first waits for all the work queued on the device, which would keep
    the host from preparing the next step's micro-batch while this step runs (TrainingRun.step's `ahead`)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu" or pinned_memory_disabled():
        return tensor.to(device=device, dtype=dtype)
    try:
        staged = tensor.to(dtype=dtype).pin_memory()
    except RuntimeError:     # the system refused to pin (its limit): a plain copy, which waits
        return tensor.to(device=device, dtype=dtype)
    return staged.to(device, non_blocking=True)


def cat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample contexts; lengths differ for long captions (77-token chunks), so each is repeated
    to the least common multiple, as ComfyUI does when it batches conditioning (comfy.conds.CONDCrossAttn)."""
    lengths = [c.shape[0] for c in contexts]
    lcm = math.lcm(*lengths)
    return torch.stack([c.repeat(lcm // c.shape[0], 1) for c in contexts])


def sample_unit_times(batch_size: int, generator: torch.Generator, settings: TrainingSettings,
                      auto: str) -> torch.Tensor:
    """t in (0, 1) per sample, drawn as `settings.timestep_sampling` says (`auto` names the default)."""
    how = auto if settings.timestep_sampling == "auto" else settings.timestep_sampling
    if how == "uniform":
        return torch.rand(batch_size, generator=generator)
    if how == "lognorm_blend":
        return lognorm_blend(batch_size, generator)
    z = torch.randn(batch_size, generator=generator)
    if how == "logit_normal":
        return torch.sigmoid(settings.logit_mean + settings.logit_std * z)
    if how == "sigmoid":
        return torch.sigmoid(settings.sigmoid_scale * z)
    raise ValueError(f"unknown timestep sampling {quoted(how)}")


def lognorm_blend(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """ai-toolkit's `timestep_type: lognorm_blend`, as toolkit/samplers/custom_flowmatch_sampler.py builds it
    once per batch: 750 log-normal values x (σ of log x 0.333) become timesteps 1000·(1 - x / max x), 250 more
    are spaced evenly from 1000 to 1, all are cut to whole timesteps, and each sample takes one of the 999
    largest (jobs/process/BaseSDTrainProcess.py draws indices in [0, 999)). σ = timestep / 1000."""
    x = torch.exp(0.333 * torch.randn(750, generator=generator))
    grid = torch.cat([(1.0 - x / x.max()) * 1000.0, torch.linspace(1000.0, 1.0, 250)])
    grid = grid.sort(descending=True).values.to(torch.int32)
    return grid[torch.randint(0, 999, (batch_size,), generator=generator)].float() / 1000.0
