"""Frozen settings objects that flow between nodes. Each field's `help` is the node input's tooltip."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A setting a user can change is wrong; the message names it and what to change."""


QUOTE_LIMIT = 200


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` for an error or a warning, cut to about `limit` characters: values come from prompts and
    job files that anyone reaching the server can send, and a message is stored in /history, logged and sent
    to every websocket client. A long text or a deeply nested value is never formatted whole."""
    if isinstance(value, str):
        text = repr(value[: limit + 1])
        return text if len(value) <= limit else f"{text[:limit]}…' ({len(value):,} characters)"
    if isinstance(value, (dict, list, tuple, set)):
        value = _clipped(value, limit)
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class _Elided:
    def __repr__(self):
        return "…"


_ELIDED = _Elided()


def _clipped(value, budget: int):
    """A copy of a container small enough to repr: at most `budget` leaves, containers past depth 4 elided.
    YAML aliases make a 640-byte document a graph whose repr is hundreds of MB: never walk it whole."""
    left = [budget]

    def clip(v, depth):
        if left[0] <= 0:
            return _ELIDED
        left[0] -= 1
        if isinstance(v, (dict, list, tuple, set)) and depth >= 4:
            return _ELIDED
        if isinstance(v, dict):
            out = {}
            for k, sub in v.items():
                if left[0] <= 0:
                    out["…"] = _ELIDED
                    break
                out[clip(k, depth + 1) if not isinstance(k, str) else k[:QUOTE_LIMIT]] = clip(sub, depth + 1)
            return out
        if isinstance(v, (list, tuple, set)):
            out = []
            for sub in v:
                if left[0] <= 0:
                    out.append(_ELIDED)
                    break
                out.append(clip(sub, depth + 1))
            return type(v)(out) if not isinstance(v, set) else out
        if isinstance(v, str):
            return v[:QUOTE_LIMIT]
        return v
    return clip(value, 0)


def check_finite(owner: str, **values) -> None:
    """NaN passes every `<` and `>` check (ComfyUI's min/max included) and inf overflows later: refuse both
    with the input's name."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value} ({owner})")


# The architectures (trainers/arch names them sdxl, sd3, flux, chroma, qwen_image, flux2, zimage) as tooltips and
# messages name them.
ARCH_LABELS = {"sdxl": "SDXL", "sd3": "SD 3.5", "flux": "Flux", "chroma": "Chroma", "qwen_image": "Qwen-Image",
               "flux2": "Flux.2", "zimage": "Z-Image"}


def _help(text: str, archs: tuple[str, ...] = (), **kwargs):
    """A field whose help is its node input's tooltip. A setting that only some architectures use (`archs`)
    names them first, "SD 3.5 / Flux only: ...": the canvas shows every input whatever MODEL is connected, so
    the tooltip is where one learns that this one does nothing for an SDXL model (and the trainer warns when it
    is set for an architecture that ignores it: ignored_settings)."""
    if archs:
        text = f"{' / '.join(ARCH_LABELS[a] for a in archs)} only: {text}"
    return field(metadata={"help": text, "archs": archs}, **kwargs)


def help_of(cls, name: str) -> str:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]


def ignored_settings(values, arch: str, unused: dict[str, str] | None = None) -> list[str]:
    """One line for each field of `values` (a settings dataclass) set to other than its default that `arch`
    does not use (its `archs` leave it out), or that this model cannot use (`unused`: name -> why, from the
    architecture). Training is the same as without them; the lines say so rather than let a setting look
    as if it did something."""
    lines = []
    for f in dataclasses.fields(values):
        value, archs = getattr(values, f.name), f.metadata.get("archs", ())
        if f.default is dataclasses.MISSING or value == f.default:
            continue
        if archs and arch not in archs:
            lines.append(f"{f.name} {value!r} is ignored: it applies to {' / '.join(ARCH_LABELS[a] for a in archs)} "
                         f"only, and the MODEL is {ARCH_LABELS[arch]}")
        elif unused and f.name in unused:
            lines.append(f"{f.name} {value!r} is ignored: {unused[f.name]}")
    return lines


MEMORY_BUDGET_MAX_GB = 4096.0
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion", "lion8bit", "adamw_schedulefree", "came")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "step")
LOSS_TYPES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TIMESTEP_SAMPLINGS = ("auto", "uniform", "logit_normal", "sigmoid", "lognorm_blend")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap", "weighted")
NAN_POLICIES = ("stop", "skip")
COMPILE_MODES = ("cuda_graphs", "off")
MASKED_LOSS = ("off", "alpha", "mask_folder")
# Qwen-Image-Edit: the ComfyUI node whose text encoding of a prompt and its image the captions are cached as
CONTROL_PROMPTS = ("TextEncodeQwenImageEdit", "TextEncodeQwenImageEditPlus")
# Create adapter's text_encoder options: which of the CLIP's encoders get adapters (trainers/text_encoder.py)
TEXT_ENCODERS = ("none", "clip_l", "clip_l+clip_g", "all")


@dataclass(frozen=True)
class DatasetConfig:
    folder: str = _help("Folder of training images with .txt captions beside them, under ComfyUI's input "
                        "folder. Sub-folders named N_name (kohya style) repeat their images N times.")
    resolution: int = _help("Training resolution: buckets have about resolution² pixels.", default=1024)
    min_side: int = _help("Smallest bucket side in pixels.", default=256)
    max_side: int = _help("Largest bucket side in pixels.", default=2048)
    max_upscale: float = _help("How far a small image may be upscaled to reach its bucket (1.0 = never "
                               "upscale; smaller buckets are made for small images instead).", default=1.0)
    default_caption: str = _help("Caption for images without a .txt file. Leave empty to require captions.",
                                 default="")
    trigger_word: str = _help("Put in front of every caption, or where a caption says [trigger].", default="")
    flip: bool = _help("Also train on every image mirrored left-right (doubles the dataset).", default=False)
    caption_ext: str = _help("Extension of caption files.", default=".txt")
    # Caption variety (kohya's shuffle_caption / keep_tokens / caption_dropout_rate, ai-toolkit's shuffle_tokens)
    shuffle_captions: bool = _help("Train each image on its caption's comma-separated tags in a shuffled order "
                                   "(kohya shuffle_caption). Captions are cached as text embeddings, so "
                                   "caption_variants orders per caption are encoded once and each step draws one.",
                                   default=False)
    keep_tokens: int = _help("With shuffle_captions, the first N tags stay in place (1 keeps the trigger word "
                             "first).", default=0)
    caption_variants: int = _help("With shuffle_captions, how many orders of each caption are cached and drawn "
                                  "from (the caption's own order and N-1 shuffles; at most 8, fewer when the "
                                  "caption has fewer orders). Each is one more text embedding to encode and keep "
                                  "in memory.", default=4)
    caption_dropout: float = _help("Probability of training an image of this folder on the empty caption (the "
                                   "larger of this and Training settings' caption_dropout applies).", default=0.0)
    # Masked loss (kohya's masked_loss, ai-toolkit's alpha_mask / mask_path / mask_min_value)
    masked_loss: str = _help("Weight each image's loss per pixel by a mask, to train on part of an image (kohya "
                             "masked_loss, ai-toolkit alpha_mask / mask_path). off: the whole image. alpha: the "
                             "image's transparency (opaque = trained, transparent = ignored; an image without alpha "
                             "trains whole; the pixels are still flattened onto white for the VAE). mask_folder: a "
                             "grayscale image of the same name (any image extension) in mask_folder: white = trained, "
                             "black = ignored, grey in between. The mask is cropped and mirrored with its image and "
                             "shrunk to the latent's size; the loss is the mean of loss x mask (kohya's).",
                             default="off")
    mask_folder: str = _help("With masked_loss mask_folder: the folder of masks under ComfyUI's input folder, laid "
                             "out as the training folder (same sub-folders, same file names).", default="")
    mask_min_value: float = _help("The lowest weight a mask gives, 0 to 1 (ai-toolkit's mask_min_value): 0.1 still "
                                  "trains the masked-out parts at a tenth.", default=0.0)
    # Edit pairs (Flux Kontext, Qwen-Image-Edit; ai-toolkit's control_path)
    control_folder: str = _help("Flux Kontext and Qwen-Image-Edit only: a folder under ComfyUI's input folder with "
                                "a control image (the image before the edit) for each training image, of the same "
                                "name (any image extension), laid out as the training folder. Each is resized and "
                                "cropped to its training image's bucket, cached as a latent beside it and given to "
                                "the model as ComfyUI's ReferenceLatent (Kontext) or TextEncodeQwenImageEdit gives a "
                                "reference image (Qwen-Image-Edit's captions are also encoded with it, as that node "
                                "does); the training image is the edited result the model learns to make "
                                "(ai-toolkit's control_path). Empty: no control images.", default="")
    control_prompt: str = _help("Qwen-Image-Edit only: the ComfyUI node you will edit with, which Cache captions "
                                "copies when it encodes each caption with its control image. "
                                "TextEncodeQwenImageEdit: Qwen-Image-Edit (the image at about 1024² to the text "
                                "encoder). TextEncodeQwenImageEditPlus: Qwen-Image-Edit 2509 / 2511 (the control "
                                "image as its image1: 384² to the text encoder, in its own template; ai-toolkit's "
                                "qwen_image_edit_plus).", default="TextEncodeQwenImageEdit")
    # Regularisation images and differential output preservation
    is_reg: bool = _help("Regularisation images (kohya is_reg, ai-toolkit datasets[].is_reg): images of the class "
                         "(other people, other dogs) that keep the adapter from changing everything of that class. "
                         "Combine them with the training images (Combine training images): each step then trains "
                         "one batch of these alongside each batch of training images, its loss times Training "
                         "settings' reg_weight (a step costs about twice as much).", default=False)
    preservation_class: str = _help("Differential output preservation: the class word the trigger word stands for "
                                    "(person, dog, style). Each caption is also cached with the trigger word replaced "
                                    "by it (one more text embedding per caption); Training settings' "
                                    "diff_output_preservation trains on them. Empty: none cached.", default="")

    # Not a field. Text encoders read 77 (CLIP) to 512 (T5) tokens, so longer text only costs encoding time
    # (a 10 MB caption kept Cache captions busy for 14 minutes); real captions stay far below this.
    MAX_CAPTION_CHARS = 8192
    # Not a field: each variant is a cached text embedding (Flux's T5 output alone is ~8 MB in fp32).
    MAX_CAPTION_VARIANTS = 8

    def __post_init__(self):
        check_finite("dataset", max_upscale=self.max_upscale)
        if self.resolution % 64 or not 64 <= self.resolution <= 4096:
            raise ConfigError(f"resolution must be a multiple of 64 between 64 and 4096, got {self.resolution}")
        if self.min_side % 64 or self.max_side % 64 or not 64 <= self.min_side <= self.max_side:
            raise ConfigError(f"min_side and max_side must be multiples of 64 with min_side <= max_side, got "
                              f"{self.min_side} and {self.max_side}")
        if self.min_side > self.resolution:   # no bucket of about resolution² pixels has such a short side
            raise ConfigError(f"min_side ({self.min_side}) must be at most resolution ({self.resolution}): "
                              f"lower min_side")
        if self.max_upscale < 1.0:
            raise ConfigError(f"max_upscale must be at least 1.0, got {self.max_upscale}")
        # The caption's path is the image's minus its extension plus caption_ext: anything but a plain
        # extension (a "/", "..") would make it a path elsewhere.
        ext = self.caption_ext
        if not (isinstance(ext, str) and 2 <= len(ext) <= 17 and ext.startswith(".") and ext.isascii()
                and all(c.isalnum() or c in "_-" for c in ext[1:])):
            raise ConfigError(f"caption_ext must be a dot and 1 to 16 letters, digits, _ or - (like .txt or "
                              f".caption), got {quoted(ext)}")
        check_finite("dataset", caption_dropout=self.caption_dropout)
        if not 1 <= self.caption_variants <= self.MAX_CAPTION_VARIANTS:
            raise ConfigError(f"caption_variants must be between 1 and {self.MAX_CAPTION_VARIANTS}, got "
                              f"{self.caption_variants}")
        if not 0 <= self.keep_tokens <= 1000:
            raise ConfigError(f"keep_tokens must be between 0 and 1000, got {self.keep_tokens}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout is a probability between 0 and 1, got {self.caption_dropout}")
        if self.control_prompt not in CONTROL_PROMPTS:
            raise ConfigError(f"control_prompt must be one of {', '.join(CONTROL_PROMPTS)}, got "
                              f"{quoted(self.control_prompt)}")
        if self.masked_loss not in MASKED_LOSS:
            raise ConfigError(f"masked_loss must be one of {', '.join(MASKED_LOSS)}, got {quoted(self.masked_loss)}")
        check_finite("dataset", mask_min_value=self.mask_min_value)
        if not 0.0 <= self.mask_min_value <= 1.0:
            raise ConfigError(f"mask_min_value must be between 0 and 1, got {self.mask_min_value}")
        if self.masked_loss == "mask_folder" and not self.mask_folder.strip():
            raise ConfigError("masked_loss mask_folder needs a mask_folder: name the folder of masks (under "
                              "ComfyUI's input folder), or set masked_loss to alpha or off")
        if self.preservation_class.strip() and not self.trigger_word.strip():
            raise ConfigError(f"preservation_class {quoted(self.preservation_class)} replaces the trigger word in "
                              f"each caption, and trigger_word is empty: set trigger_word, or clear "
                              f"preservation_class")
        for name in ("default_caption", "trigger_word", "preservation_class"):
            if len(getattr(self, name)) > self.MAX_CAPTION_CHARS:
                raise ConfigError(f"{name} is {len(getattr(self, name)):,} characters, more than the "
                                  f"{self.MAX_CAPTION_CHARS:,} a caption may have (text encoders read at most 77 "
                                  f"to 512 tokens): shorten it")


@dataclass(frozen=True)
class AdapterSpec:
    arch: str = _help("Architecture the adapter belongs to (sdxl, sd3, flux, chroma, qwen_image, flux2, zimage).")
    kind: str = _help("Adapter type.", default="lora")
    rank: int = _help("Rank of the low-rank update: higher learns more detail and costs more memory.",
                      default=16)
    alpha: float = _help("Scale numerator: the update is multiplied by alpha / rank.", default=16.0)
    preset: str = _help("Which layers get adapters: attention, attention_mlp (attention + feed-forward), or "
                        "all_linear.", default="attention_mlp")
    seed: int = _help("Seed of the adapter's initial weights.", default=0)
    dtype: str = _help("Storage dtype of the trainable weights (fp32 keeps exact master weights).",
                       default="fp32")
    targets: tuple[tuple, ...] = _help("(module path, in features, out features) of every adapted linear layer; "
                                       "(module path, in channels, out channels, kernel height, kernel width) "
                                       "of every adapted convolution.", default=())
    dora: bool = _help("DoRA (weight-decomposed): also learn each layer's per-input-channel magnitude, "
                       "m · (W + ΔW) / ‖W + ΔW‖ per column. Works with every adapter type; costs a full-size "
                       "weight per layer and step.", default=False)
    lokr_factor: int = _help("LoKr: split each layer's in and out sizes into two factors near this number "
                             "(-1 = automatic, the most balanced split, as LyCORIS does). Smaller factors make "
                             "the small Kronecker matrix smaller.", default=-1)
    lokr_full_w2: bool = _help("LoKr: keep the large Kronecker matrix w2 full rank instead of w2_a·w2_b of the "
                               "given rank (alpha is then not applied: the scale is 1, as in LyCORIS). Layers "
                               "whose w2 is smaller than 2·rank are full rank either way.", default=False)
    conv: bool = _help("Also adapt the UNet's convolution layers (LoCon: ResBlocks, Downsample, Upsample); "
                       "SD 3.5 and Flux have none.", archs=("sdxl",), default=False)
    conv_rank: int = _help("With conv_layers, rank for the convolution layers (0 = the same as rank).",
                           archs=("sdxl",), default=0)
    conv_alpha: float = _help("With conv_layers, alpha for the convolution layers (0 = the same as alpha).",
                              archs=("sdxl",), default=0.0)
    text_encoder: str = _help(
        "Also train the text encoder (connect the CLIP): none; clip_l; clip_l+clip_g (SDXL, SD 3.5; on Flux "
        "the same as clip_l); all (CLIP-L, CLIP-G and T5-XXL where the CLIP has them). Adapters go on the "
        "encoders' attention and MLP layers with this rank and alpha, are saved under kohya's lora_te1_ "
        "(CLIP-L) / lora_te2_ (CLIP-G) keys (T5: lora_te3_ on SD 3.5, lora_te2_ on Flux, lora_te1_ on Chroma, "
        "whose CLIP is T5 alone) and apply through "
        "the stock LoRA loader's CLIP input. While training, the CLIP is loaded on the GPU beside the model "
        "(T5-XXL's weights too: ~9.5 GB in bf16, ~4.8 GB in fp8), the trained encoders "
        "encode each step's captions, and the frozen ones' outputs (T5 unless 'all') are computed once per "
        "caption and kept. T5-XXL is off unless 'all': without gradient_checkpointing, training it keeps the "
        "activations of its 24 blocks for backward (estimated, not measured: ~5 GB at 512 tokens, as ComfyUI "
        "runs text encoders in fp32); with it, the trained encoders' blocks are recomputed in backward like "
        "the model's. Z-Image: none (its Qwen3-4B text encoder does not train).", default="none")

    def __post_init__(self):
        check_finite("adapter", alpha=self.alpha, conv_alpha=self.conv_alpha)
        if self.text_encoder not in TEXT_ENCODERS:
            raise ConfigError(f"text_encoder must be one of {', '.join(TEXT_ENCODERS)}, "
                              f"got {quoted(self.text_encoder)}")
        if self.alpha < 0 or self.conv_alpha < 0:
            raise ConfigError(f"alpha and conv_alpha must not be negative, got {self.alpha}, {self.conv_alpha}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"lokr_factor must be -1 (automatic) or a positive number, got {self.lokr_factor}")
        if self.rank < 1 or self.conv_rank < 0:
            raise ConfigError(f"rank must be at least 1 and conv_rank at least 0, got {self.rank}, {self.conv_rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def rank_for(self, target: tuple) -> int:
        """Rank of one target: conv_rank (or rank) for convolutions, rank for linear layers."""
        return (self.conv_rank or self.rank) if len(target) == 5 else self.rank

    def alpha_for(self, target: tuple) -> float:
        return (self.conv_alpha or self.alpha) if len(target) == 5 else self.alpha


@dataclass(frozen=True)
class TrainingSettings:
    optimizer: str = _help("adamw: torch's AdamW, the usual choice. adamw8bit: bitsandbytes' AdamW with 8-bit state "
                           "(about the same training; saves 6 bytes per adapter parameter, ~0.23 GiB for an SDXL "
                           "r16 LoRA, as fast as adamw: all adapter tensors step as one flat tensor; on an H200 "
                           "SDXL 0.0994 s/step against adamw's 0.0999). adafactor: transformers' Adafactor at the given "
                           "learning rate (factored second moments: the least memory). prodigy: finds its own step "
                           "size; set learning_rate to 1.0. lion (bitsandbytes): sign updates, one moment; use a "
                           "learning rate 3-10x lower than AdamW's. lion8bit: Lion with 8-bit state. "
                           "adamw_schedulefree: schedule-free AdamW (needs no decay schedule: keep constant); the "
                           "adapter saved and sampled is its averaged weights. came (pytorch-optimizer): "
                           "confidence-guided Adafactor, little memory, steadier than Adafactor.",
                           default="adamw")
    learning_rate: float = _help("Peak learning rate.", default=1e-4)
    schedule: str = _help("Learning-rate schedule after warm-up (transformers' schedules): constant (and its "
                          "alias constant_with_warmup; warm-up applies to every schedule), linear decay to 0, cosine "
                          "to 0, cosine_with_restarts (schedule_cycles cosines, each back from the peak), polynomial "
                          "decay to 0 (schedule_power), step (times schedule_gamma every schedule_step_size steps).",
                          default="constant")
    warmup_steps: int = _help("Steps of linear warm-up from 0 to the learning rate.", default=0)
    total_steps: int = _help("Length of the schedule in optimizer steps (decay ends here). 0 = take the "
                             "steps of the Train node.", default=0)
    weight_decay: float = _help("Decoupled weight decay.", default=0.01)
    max_grad_norm: float = _help("Clip the gradient norm to this (0 = no clipping).", default=1.0)
    batch_size: int = _help("Images per batch (a batch is drawn from one aspect bucket).", default=1)
    grad_accumulation: int = _help("Batches accumulated per optimizer step.", default=1)
    precision: str = _help("Precision of the forward pass: auto (the dtype the MODEL computes in, as loaded: "
                           "fp16 with loss scaling or bf16, without casting its weights; bf16 for an fp32 MODEL), "
                           "bf16, fp16 (with loss scaling), fp32. A precision other than the MODEL's costs a cast of "
                           "every weight in every step.", default="auto")
    gradient_checkpointing: bool = _help("Recompute activations in backward: much less memory, ~30% slower.",
                                         default=True)
    checkpoint_fraction: float = _help("With gradient checkpointing, the share of the model's blocks recomputed "
                                       "in backward, spread evenly (1.0 = all). Lower is faster and needs more "
                                       "memory: Flux-dev at 1024² gains ~0.5 GiB and ~3.5 ms per block left out.",
                                       default=1.0)
    recompute_attention: bool = _help("With gradient checkpointing, recompute attention too. Off keeps each "
                                      "block's attention output from the forward pass (Flux ~1.6 GiB, SDXL ~0.3 GiB "
                                      "at 1024²) and saves its recomputation (~5% faster), and LoRA's rank-r "
                                      "projections (SDXL ~20 MB, ~3% faster).", default=False)
    recompute_layers: bool = _help("With gradient checkpointing, recompute the outputs of the blocks' convolutions, "
                                   "LoRA Linear layers and FP8 products (fp8_compute) in backward. Off keeps them "
                                   "from the forward pass: the recomputation skips the blocks' matrix products, for "
                                   "the memory of their outputs (at 1024² on an H200: SD 3.5 Large with fp8 "
                                   "weights and fp8_compute +6.4 GiB, 0.213 → 0.182 s/step; SDXL +2.9 GiB, 0.097 → "
                                   "0.080). LoKr, LoHa and DoRA layers recompute as before.", default=True)
    seed: int = _help("Seed for batch order, noise, timesteps, caption dropout and the caption variant each step "
                      "draws.", default=0)
    noise_offset: float = _help("Per-channel noise offset (0.0-0.1 helps very dark/bright images).",
                                default=0.0)
    min_snr_gamma: float = _help("Min-SNR loss weighting γ (5 is common; 0 = off). SD 3.5 and Flux weigh the "
                                 "loss by loss_weighting instead.", archs=("sdxl",), default=0.0)
    caption_dropout: float = _help("Probability of training a sample on the empty caption.", default=0.0)
    timestep_sampling: str = _help("How training timesteps are drawn: auto (SDXL uniform, SD3/Flux "
                                   "logit_normal), uniform, logit_normal (mean, std), sigmoid (of a normal "
                                   "times sigmoid_scale), lognorm_blend (ai-toolkit's: 3/4 log-normal toward "
                                   "high noise, 1/4 uniform). SD3/Flux apply their timestep shift after.",
                                   default="auto")
    logit_mean: float = _help("Mean of logit_normal timestep sampling (higher trains more at high noise).",
                              default=0.0)
    logit_std: float = _help("Standard deviation of logit_normal timestep sampling.", default=1.0)
    sigmoid_scale: float = _help("Scale of sigmoid timestep sampling (larger spreads timesteps to the ends).",
                                 default=1.0)
    timestep_shift: float = _help("Timestep shift α (σ = αt / (1 + (α-1)t)). 0 = the model's own: SD3 3.0; "
                                  "Flux-dev from each bucket's resolution as ComfyUI's ModelSamplingFlux "
                                  "computes it; Chroma and Qwen-Image e^1.15 ≈ 3.16 (ComfyUI's default); Flux.2 "
                                  "e^2.02 ≈ 7.5 (its own); Z-Image 3.0; a model patched by "
                                  "ModelSamplingSD3/Flux/AuraFlow keeps its shift. 1 = no shift.",
                                  archs=("sd3", "flux", "chroma", "qwen_image", "flux2", "zimage"), default=0.0)
    resolution_shift: bool = _help("Shift each sample by its bucket's resolution as Flux-dev's sampler does (μ "
                                   "linear in the latent's 2×2 patches, 0.5 at 256² to 1.15 at 1024² pixels, "
                                   "α = e^μ), whatever the model's own shift (ai-toolkit's shift / flux_shift on "
                                   "Flux). Qwen-Image: its own scheduler's range instead, μ 0.5 at 256² to 0.9 at "
                                   "1448² pixels (α ≈ 2.0 at 1024²). A timestep_shift other than 0 wins.",
                                   archs=("sd3", "flux", "chroma", "qwen_image", "flux2", "zimage"), default=False)
    loss_weighting: str = _help("Loss weight per σ: none, sigma_sqrt (1/σ²), cosmap (SD3 paper), weighted "
                                "(ai-toolkit's timestep_type: weighted: a weight per 1/1000 of σ measured on "
                                "Flex.1-alpha: 0.91 at σ 1, 1.52 at σ 0.88, 0.45 near 0). SDXL weighs by "
                                "min_snr_gamma instead.",
                                archs=("sd3", "flux", "chroma", "qwen_image", "flux2", "zimage"), default="none")
    flux_guidance: float = _help("Guidance input of Flux-dev / Flux.2-dev while training (1.0 is usual; schnell "
                                 "has none and ignores it).", archs=("flux", "flux2"), default=1.0)
    nan_policy: str = _help("When the loss or the gradients are NaN/inf: stop (an error naming the step; the "
                            "adapter keeps its last good weights) or skip that step (counted; training stops after "
                            "10 in a row).", default="stop")
    optimizer_offload: bool = _help("Keep the optimizer state and fp32 master weights in CPU memory and step "
                                    "there. Saves only those (8-12 bytes per adapter parameter: ~0.31 GiB for an "
                                    "SDXL r16 LoRA, ~0.42 GiB for Flux), and costs a copy each way and a CPU step per "
                                    "step that nothing overlaps. To fit a large model on a small card use "
                                    "memory_budget_gb, which streams the model's weights.", default=False)
    compile: str = _help("cuda_graphs: after two warm-up steps per bucket, each training step's GPU work is "
                         "captured once (about a second) and replayed, which removes Python's launch overhead "
                         "(SDXL trains several times faster). off: train without graphs. Same results either way; "
                         "CPU training always runs without graphs.", default="cuda_graphs")
    # Schedule shapes and loss types (kept together: later settings go after this group).
    schedule_cycles: int = _help("cosine_with_restarts: how many cosine cycles the schedule has (the learning rate "
                                 "jumps back to its peak at the start of each).", default=1)
    schedule_power: float = _help("polynomial: power of the decay to 0 (1 = linear, 2 = falls faster early).",
                                  default=1.0)
    schedule_step_size: int = _help("step: multiply the learning rate by schedule_gamma every this many steps "
                                    "after warm-up (0 = a quarter of the schedule).", default=0)
    schedule_gamma: float = _help("step: the factor each drop multiplies the learning rate by.", default=0.1)
    loss_type: str = _help("mse: squared error, the models' own objective. l1: absolute error (less pulled by "
                           "outliers, sharper details). huber: squared near 0, linear past huber_c (robust to "
                           "corrupted images and captions); smooth_l1: the same, scaled as L1. Huber and smooth_l1 "
                           "use kohya's pseudo-Huber and huber_schedule.", default="mse")
    huber_schedule: str = _help("huber / smooth_l1 threshold per timestep, as kohya's: snr (huber_c at high noise, "
                                "near 1 at low noise), exponential (huber_scale at t=0 down to huber_c·huber_scale "
                                "at the last timestep), constant (huber_c·huber_scale).", default="snr")
    huber_c: float = _help("huber / smooth_l1: the threshold parameter (kohya's default 0.1; between 0 and 1).",
                           default=0.1)
    huber_scale: float = _help("huber / smooth_l1: scales the exponential and constant thresholds.", default=1.0)
    # EMA of the adapter's weights (ai-toolkit's ema_config, SimpleTuner's and OneTrainer's EMA)
    ema: bool = _help("Keep an exponential moving average (EMA) of the adapter's weights: a smoother adapter that "
                      "often samples better late in training. With it on, Save adapter writes the EMA weights, and "
                      "sampling and Train steps' MODEL use them; the raw weights train on and are kept in the "
                      ".eri-state, so a resume continues exactly. A Train steps with ema off drops the EMA.",
                      default=False)
    ema_decay: float = _help("Share of the EMA kept at each update: ema = decay·ema + (1-decay)·weights. 0.99 "
                             "follows the last ~100 updates, 0.999 the last ~1000.", default=0.999)
    ema_every: int = _help("Update the EMA after every N optimizer steps (counted from the adapter's creation).",
                           default=1)
    ema_on_cpu: bool = _help("Keep the EMA in CPU memory (saves GPU memory, costs a copy of the adapter per "
                             "update).", default=False)
    # Regularisation images (kohya's prior_loss_weight, ai-toolkit's train.reg_weight) and ai-toolkit's
    # differential output preservation
    reg_weight: float = _help("Weight of the regularisation images' loss (kohya prior_loss_weight, ai-toolkit "
                              "reg_weight): a batch of them trains alongside each batch of training images, its "
                              "loss times this. 0 = they change nothing (training equals training without them, "
                              "at twice the cost). Needs a dataset with is_reg combined with the training images.",
                              default=1.0)
    diff_output_preservation: bool = _help(
        "Differential output preservation (ai-toolkit): at every step, besides the normal loss, the caption with "
        "the trigger word replaced by the class word (Training images' preservation_class) is run through the "
        "model without the adapter and with it, and the adapter's prediction is pulled toward the model's own, "
        "so that the class (a person, a dog) keeps looking as it did while the trigger word learns. Costs two "
        "more forward passes (one without gradients) and a backward per step. CUDA graphs capture the whole "
        "step, the preservation passes included.", default=False)
    diff_output_preservation_multiplier: float = _help(
        "Weight of the preservation loss (mean squared difference between the adapter's and the base model's "
        "predictions on the class caption), added to the normal loss.", default=1.0)
    # Text-encoder training (AdapterSpec.text_encoder): kohya's and ai-toolkit's text_encoder_lr
    # Streaming the frozen base weights between CPU and GPU memory (trainers/offload.py)
    memory_budget_gb: float = _help(
        "GPU memory the training may use, in GiB (0 = no limit: the whole model is loaded, as usual). The training's "
        "own needs (the adapter, its gradients and optimizer state, the activations) are estimated and the model's "
        "frozen weights get the rest: ComfyUI keeps as many of its layers on the GPU as fit and copies the others "
        "from CPU memory as each runs, in the forward pass and again when gradient checkpointing recomputes a block, "
        "so one block's weights at a time are on the GPU. For Flux or SD 3.5 Large on 8-16 GB cards: set it a "
        "little below the card's memory (e.g. 10 on a 12 GB card). Slower the more layers stream; same results. "
        "Needs gradient_checkpointing for the savings; turns CUDA graphs off (the host copies the weights).",
        default=0.0)
    fp8_compute: bool = _help(
        "Measured on an H200 at 1024²: Flux-dev 13 % and SD 3.5 Large 8 % faster per step than bf16, the same "
        "peak memory. Runs the frozen base model's matrix products inside the transformer blocks in FP8 (e4m3 "
        "activations and weights, e5m2 gradients, dynamic power-of-two scales) on the GPU's FP8 tensor cores, "
        "which multiply at twice bf16's rate. Needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper: "
        "sm89/sm90). The adapter still computes and trains in its own precision; the base layers' outputs and input gradients carry FP8's rounding (~3 significant bits per "
        "input) instead of bf16's, so losses differ slightly from a bf16 run. No extra memory (weights are "
        "quantized per use, never stored twice). Training only: the MODEL Train steps outputs and saved files "
        "sample as always. Layers whose weights memory_budget_gb keeps in CPU memory when they run stay in bf16.",
        archs=("sd3", "flux", "chroma", "qwen_image", "flux2", "zimage"), default=False)
    text_encoder_lr: float = _help("Learning rate of the text-encoder adapter, when the adapter has one (Create "
                                   "adapter's text_encoder); it follows the same warm-up and schedule. 0 = the "
                                   "same as learning_rate. Text encoders are usually trained 2-10x slower than "
                                   "the diffusion model (e.g. 5e-5 with a learning_rate of 1e-4).", default=0.0)

    def __post_init__(self):
        check_finite("training settings", **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                             if f.type in ("float", float)})
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {quoted(self.optimizer)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {quoted(self.schedule)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {quoted(self.precision)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1 or self.grad_accumulation < 1:
            raise ConfigError("batch_size and grad_accumulation must be at least 1")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, "
                              f"got {quoted(self.timestep_sampling)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, "
                              f"got {quoted(self.loss_weighting)}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {quoted(self.nan_policy)}")
        if not 0.0 <= self.checkpoint_fraction <= 1.0:
            raise ConfigError(f"checkpoint_fraction is a share between 0 and 1, got {self.checkpoint_fraction}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {quoted(self.compile)}")
        if self.logit_std <= 0 or self.sigmoid_scale <= 0:
            raise ConfigError("logit_std and sigmoid_scale must be positive")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.noise_offset < 0 or self.min_snr_gamma < 0:
            raise ConfigError("weight_decay, max_grad_norm, noise_offset and min_snr_gamma must not be negative")
        if self.timestep_shift < 0:
            raise ConfigError(f"timestep_shift must be 0 (the model's own) or positive, got {self.timestep_shift}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout is a probability between 0 and 1, got {self.caption_dropout}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {quoted(self.loss_type)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ConfigError(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, "
                              f"got {quoted(self.huber_schedule)}")
        if not 0.0 < self.huber_c <= 1.0 or not self.huber_scale > 0:
            raise ConfigError(f"huber_c must be above 0 and at most 1 and huber_scale positive, got {self.huber_c} "
                              f"and {self.huber_scale}")
        if self.schedule_cycles < 1 or self.schedule_step_size < 0:
            raise ConfigError(f"schedule_cycles must be at least 1 and schedule_step_size at least 0, got "
                              f"{self.schedule_cycles} and {self.schedule_step_size}")
        if not self.schedule_power > 0 or not 0.0 < self.schedule_gamma <= 1.0:
            raise ConfigError(f"schedule_power must be positive and schedule_gamma above 0 and at most 1, got "
                              f"{self.schedule_power} and {self.schedule_gamma}")
        if self.ema and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be between 0 and 1 (0.999 is common), got {self.ema_decay}")
        if not 0.0 <= self.reg_weight <= 1000.0:
            raise ConfigError(f"reg_weight must be between 0 and 1000, got {self.reg_weight}")
        if not 0.0 <= self.diff_output_preservation_multiplier <= 1000.0:
            raise ConfigError(f"diff_output_preservation_multiplier must be between 0 and 1000, got "
                              f"{self.diff_output_preservation_multiplier}")
        if not 0.0 <= self.text_encoder_lr <= 1.0:
            raise ConfigError(f"text_encoder_lr must be between 0 (the learning rate) and 1, "
                              f"got {self.text_encoder_lr}")
        if not 0.0 <= self.memory_budget_gb <= MEMORY_BUDGET_MAX_GB:
            raise ConfigError(f"memory_budget_gb must be between 0 (no limit) and {MEMORY_BUDGET_MAX_GB} GiB, "
                              f"got {self.memory_budget_gb}")
        if not 1 <= self.ema_every <= 1_000_000:
            raise ConfigError(f"ema_every must be between 1 and 1000000 steps, got {self.ema_every}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
