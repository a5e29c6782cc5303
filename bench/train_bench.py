"""LoRA training speed and memory: EriDiffusion's engine vs. ComfyUI's built-in TrainLoraNode, in one process.

Builds random-init models with ComfyUI's own classes (no checkpoint file, no VAE, no text encoder) in bf16 —
sdxl, sd35l (SD 3.5 Large), flux (Flux.1-dev), chroma, kontext (Flux.1 Kontext-dev: Flux-dev trained on edit pairs,
the control latent fed as a reference latent), flux2 (Flux.2-dev), qwen_image, zimage (Z-Image Turbo) — and
sd35l_fp8, flux_fp8, flux2_fp8, qwen_image_fp8 with fp8 (e4m3fn) weights computed in bf16 — trains a rank-16
LoRA (preset attention_mlp, AdamW, lr 1e-4, batch 1) on synthetic latents and text embeddings with
gradient checkpointing on and off, and times the built-in node on the same model.

On the GPU machine (full size, 1024x1024), from the repository root:

    python bench/train_bench.py --arch sdxl flux --out "$OUT"    # add --steps N, --no-builtin, --variants gc
    python bench/train_bench.py --fresh --arch flux --out "$OUT"  # each side in its own process (as quoted)

ComfyUI is found through $COMFYUI_PATH or .comfyui/path. On a CPU, in seconds:

    .venv/bin/python bench/train_bench.py --tiny --steps 3 --arch sdxl sd35l flux
    .venv/bin/python bench/train_bench.py --tiny --steps 2 --variants gc --arch chroma kontext flux2 qwen_image zimage

Writes train_bench.json (one record per arch and variant) into --out (default $OUT, else /tmp) and prints
a table.

`--write-job DIR` (sdxl, sd35l) writes what the headless command trains instead, with nothing downloaded: a
checkpoint file of random weights (model, CLIP-L/G, VAE), images with captions and a YAML job using them:

    python bench/train_bench.py --arch sdxl --write-job /tmp/job --steps 20
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 2 -m comfyui-eridiffusion train /tmp/job/job.yaml
"""
from __future__ import annotations

import argparse, dataclasses, datetime, gc, importlib.machinery, inspect, importlib.util, json, os, statistics
import subprocess, sys, time, traceback, types, typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(*args):
    if "MAIN" not in globals() or MAIN:
        print(*args, flush=True)


def comfyui_dir() -> Path:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    return Path((ROOT / ".comfyui" / "path").read_text().strip())


def stub(name):
    """A permissive stand-in module (the GPU machine lacks `av`; nothing here calls it)."""
    m = types.ModuleType(name)

    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})
    m.__getattr__ = getattr_
    m.__path__ = []
    m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = m


def import_pack():
    """The repository root as package `eridiffusion` (as ComfyUI imports it, under a stable name)."""
    if "eridiffusion" not in sys.modules:
        spec = importlib.util.spec_from_file_location("eridiffusion", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["eridiffusion"] = module
        spec.loader.exec_module(module)
    return sys.modules["eridiffusion"]


args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
args.add_argument("--arch", nargs="+", default=["sdxl"],
                  choices=["sdxl", "sd35l", "sd35l_fp8", "flux", "flux_fp8", "chroma", "kontext", "flux2", "flux2_fp8",
                           "qwen_image", "qwen_image_fp8", "zimage"])
args.add_argument("--variants", nargs="+", default=["gc", "nogc"], choices=["gc", "nogc"],
                  help="with and/or without gradient checkpointing")
args.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to time")
args.add_argument("--adapter", nargs="+", default=["lora"], choices=["lora", "dora", "lokr", "loha"],
                  help="adapter types to time (rank 16; LoKr: factor -1, w2 decomposed at rank 16)")
args.add_argument("--compile", nargs="+", default=["cuda_graphs"], choices=["cuda_graphs", "off"],
                  help="our step with CUDA graphs and/or without (TrainingSettings.compile)")
args.add_argument("--fraction", type=float, nargs="+", default=[1.0],
                  help="checkpoint_fraction values to time with gradient checkpointing (gc)")
args.add_argument("--recompute-attention", action="store_true",
                  help="recompute attention in checkpointed blocks too (recompute_attention)")
args.add_argument("--copy-gradients", action="store_true",
                  help="copy a replayed graph's gradients into the parameters' own (before adopt_gradients)")
args.add_argument("--keep-layers", action="store_true",
                  help="keep the LoRA / FP8 Linear layers' outputs in checkpointed blocks (recompute_layers off)")
args.add_argument("--one-at-a-time", action="store_true",
                  help="each step's micro-batches start after the step before returned (before step(ahead=True))")
args.add_argument("--queue", action="store_true",
                  help="also time from loading the model file (ComfyUI's UNETLoader, after saving the random model) "
                       "to the first training step and to the first graph-replayed step, with 3 aspect buckets")
args.add_argument("--queue-only", action="store_true", help="with --queue: only the queue timings (no runs of the built model)")
args.add_argument("--queue-dtype", nargs="+", default=["auto", "bf16"], choices=["auto", "bf16"],
                  help="with --queue: the dtypes to load the model file in (auto: ComfyUI's choice, the node's default)")
args.add_argument("--dynamic-vram", action="store_true",
                  help="ComfyUI 0.33: start comfy-aimdo as its main.py does on NVIDIA, so that --queue loads the file "
                       "as a ModelPatcherDynamic MODEL (training runs on its non-dynamic delegate)")
args.add_argument("--profile", action="store_true",
                  help="after timing, profile one eager step and print the GPU kernels taking the most time")
args.add_argument("--channels-last", action="store_true",
                  help="experiment: the model's convolution weights in channels_last memory format")
args.add_argument("--sdpa", nargs="+", default=None,
                  choices=["flash", "efficient", "cudnn", "math"],
                  help="experiment: torch SDPA backends for training, in priority order (trainers.blocks)")
args.add_argument("--no-fused-lora", action="store_true",
                  help="experiment: LoRA's backward by autograd instead of LoraLinear (trainers.adapters.lora)")
args.add_argument("--no-fused-geglu", action="store_true",
                  help="experiment: SDXL's GEGLU by ComfyUI's eager ops instead of the Triton kernels (trainers.fused)")
args.add_argument("--no-fused-group-norm", action="store_true",
                  help="experiment: SDXL's GroupNorm by PyTorch's kernel instead of the Triton kernels (trainers.fused)")
args.add_argument("--no-fused-rope", action="store_true",
                  help="experiment: the DiTs' rotary embedding by ComfyUI's eager ops instead of the Triton kernels "
                       "(trainers.fused)")
args.add_argument("--no-fused-gelu", action="store_true",
                  help="experiment: the Flux single blocks' GELU (tanh) on a strided slice by PyTorch's kernel instead of "
                       "the Triton kernels (trainers.fused)")
args.add_argument("--no-fused-rms-norm", action="store_true",
                  help="the QK norms (RMSNorm) of Flux and SD 3.5 through torch's own kernel (the A side of its A/B)")
args.add_argument("--no-fused-concat", action="store_true",
                  help="the Flux blocks' concatenations by torch.cat (q and k of the double blocks, the single blocks' "
                       "attention and MLP activation) instead of written in place (the A side of its A/B)")
args.add_argument("--no-contiguous-blocks", action="store_true",
                  help="SD 3.5's blocks on ComfyUI's transposed x, not copied contiguous first (the A side of its A/B; "
                       "Architecture.contiguous_block_inputs)")
args.add_argument("--no-kept-projections", action="store_true",
                  help="checkpointed blocks recompute the adapters' rank-r projections too (the A side of its A/B; "
                       "trainers.blocks.kept_in_checkpoints)")
args.add_argument("--no-gc-freeze", action="store_true",
                  help="experiment: leave Python's collector on every object while training (trainers.loop)")
args.add_argument("--memory-budget-gb", type=float, nargs="+", default=[0.0],
                  help="memory_budget_gb values to time (0: the whole model loaded; issue 21: 8 12 16 24)")
args.add_argument("--optimizer", nargs="+", default=["adamw"], choices=["adamw", "adamw8bit"],
                  help="optimizers to time (adamw8bit: bitsandbytes)")
args.add_argument("--optimizer-offload", action="store_true", help="optimizer_offload on (the state in CPU memory)")
args.add_argument("--builtin-offloading", action="store_true",
                  help="ComfyUI 0.33's TrainLoraNode with offloading on (weights streamed from CPU memory)")
args.add_argument("--fp8-compute", action="store_true",
                  help="fp8_compute: the blocks' frozen Linear GEMMs in FP8 (issue 24; needs sm89+, or the CPU)")
args.add_argument("--gradient-cosine", action="store_true",
                  help="with --fp8-compute: after timing, one batch's adapter gradients with FP8 compute and without, "
                       "from the trained adapter (eager), and their cosine similarity (issue 24)")
args.add_argument("--resolution", type=int, default=0, help="image side in pixels (default 1024; --tiny 64)")
args.add_argument("--train-seed", type=int, default=0,
                  help="TrainingSettings.seed: batch order, noise and timesteps (the adapter's initial weights keep seed 0)")
args.add_argument("--record-losses", action="store_true", help="every step's loss in the record (`losses`)")
args.add_argument("--tiny", action="store_true", help="tiny models, fp32, CPU, 64x64 (seconds)")
args.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 3 warm-up steps)")
args.add_argument("--out", default=os.environ.get("OUT") or "/tmp")
args.add_argument("--no-builtin", action="store_true", help="skip ComfyUI's TrainLoraNode")
args.add_argument("--builtin-only", action="store_true", help="time only ComfyUI's TrainLoraNode")
args.add_argument("--fresh", action="store_true",
                  help="each side in a fresh process: this script with --no-builtin, then with --builtin-only "
                       "(what docs/BENCHMARKS.md quotes since 2026-12-03); the records are merged")
args.add_argument("--write-job", metavar="DIR", default=None,
                  help="write a random-init checkpoint file, images and a YAML job training on them into DIR "
                       "(--arch sdxl or sd35l; --steps: the job's steps) instead of timing anything")
ARGS = args.parse_args()

for mod in ["av", "av.container", "av.subtitles", "av.subtitles.stream"]:
    try:
        __import__(mod)
    except Exception:
        stub(mod)
sys.path.insert(0, str(comfyui_dir()))
import torch  # noqa: E402
if "LOCAL_RANK" in os.environ and torch.cuda.is_available():   # under torchrun: one GPU per process
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))         # (before ComfyUI picks its device)
import comfy.cli_args  # noqa: E402
if ARGS.tiny or not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True     # must precede the first import of comfy.model_management
if ARGS.dynamic_vram:
    import comfy_aimdo.control
    comfy_aimdo.control.init()     # as ComfyUI 0.33's main.py, before comfy.model_management
import comfy.model_management as mm  # noqa: E402
if ARGS.dynamic_vram and not comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices()):
    raise SystemExit("--dynamic-vram: comfy-aimdo did not start")
import comfy.model_patcher, comfy.supported_models  # noqa: E401,E402
import_pack()
from eridiffusion.trainers.cache import LatentSet, TextEmbedding, TextSet  # noqa: E402
from eridiffusion.trainers.checkpoint import make_spec  # noqa: E402
from eridiffusion.trainers.comfy_compat import chroma_config, flux2_config, flux_config, training_mode  # noqa: E402
from eridiffusion.trainers.config import DatasetConfig, TrainingSettings  # noqa: E402
from eridiffusion.trainers.data import Bucket, Dataset, DatasetItem  # noqa: E402
from eridiffusion.trainers.loop import TrainingRun  # noqa: E402
from eridiffusion.trainers import loop as engine_loop  # noqa: E402
from eridiffusion.trainers.state import new_adapter  # noqa: E402
from eridiffusion.trainers.distributed import init_from_env  # noqa: E402
from eridiffusion.trainers.offload import streamed_layers  # noqa: E402

if ARGS.sdpa:
    from torch.nn.attention import SDPBackend
    import eridiffusion.trainers.blocks as _blocks
    _blocks.TRAINING_SDPA_PRIORITY = [{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                                       "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[b] for b in ARGS.sdpa]
if ARGS.no_gc_freeze:
    import contextlib
    import eridiffusion.trainers.loop as _loop
    _loop.long_lived_objects_frozen = contextlib.nullcontext
if ARGS.no_fused_lora:
    import eridiffusion.trainers.adapters.lora as _lora
    _lora.FUSED_LINEAR = False
import eridiffusion.trainers.fused as _fused  # noqa: E402
_fused.ENABLED["geglu"] &= not ARGS.no_fused_geglu
_fused.ENABLED["group_norm"] &= not ARGS.no_fused_group_norm
_fused.ENABLED["rope"] &= not ARGS.no_fused_rope
_fused.ENABLED["gelu"] &= not ARGS.no_fused_gelu
_fused.ENABLED["rms_norm"] &= not ARGS.no_fused_rms_norm
_fused.ENABLED["concat"] &= not ARGS.no_fused_concat
if ARGS.no_kept_projections:
    import eridiffusion.trainers.blocks as _blocks
    _blocks._PRODUCT_OPS = frozenset()
if ARGS.copy_gradients:
    import eridiffusion.trainers.loop as _loop
    _loop.ADOPT_GRADIENTS = False
if ARGS.no_contiguous_blocks:
    from eridiffusion.trainers.arch.sd3 import SD3 as _SD3
    _SD3.contiguous_block_inputs = False
DEV = mm.get_torch_device()
CUDA = DEV.type == "cuda"
# torchrun --nproc_per_node N bench/train_bench.py ...: data parallel, batch per GPU, gradients all-reduced
WORLD = init_from_env(DEV.type)
MAIN = WORLD is None or WORLD.is_main
DT = torch.float32 if ARGS.tiny or not CUDA else torch.bfloat16
PRECISION = "fp32" if DT == torch.float32 else "bf16"
if ARGS.tiny:
    torch.set_num_threads(1)   # a smoke test: one thread keeps CPU timings steady on a busy, small machine

# Full-size configs (as ComfyUI detects them from the released checkpoints) and the tests' tiny ones
# (tests/eri_test_nodes/tiny_models.py).
SDXL = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
        'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4, 'model_channels': 320,
        'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10], 'channel_mult': [1, 2, 4],
        'transformer_depth_middle': 10, 'use_linear_in_transformer': True, 'context_dim': 2048,
        'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
        'use_temporal_attention': False, 'use_temporal_resblock': False}
SDXL_TINY = {"model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": 64, "num_head_channels": 16, "adm_in_channels": 32 + 6 * 256, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_temporal_attention": False, "use_temporal_resblock": False}
FLUX = flux_config({"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
        "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
        "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
        "patch_size": 2})
FLUX_TINY = {**FLUX, "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
             "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12]}
SD35L = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 38, "input_size": None,
         "adm_in_channels": 2048, "context_embedder_config": {"target": "torch.nn.Linear",
                                                              "params": {"in_features": 4096, "out_features": 2432}},
         "num_patches": 36864, "pos_embed_max_size": 192, "qk_norm": "rms", "pos_embed_scaling_factor": None,
         "x_block_self_attn_layers": []}
SD35L_TINY = {**SD35L, "depth": 2, "adm_in_channels": 64, "num_patches": 256, "pos_embed_max_size": 16,
              "qk_norm": None, "context_embedder_config": {"target": "torch.nn.Linear",
                                                           "params": {"in_features": 4096, "out_features": 128}}}
# Chroma: Flux-schnell's blocks, modulated by the approximator (distilled_guidance_layer); T5 context, no pooled
# vector. in/out_channels count the 2x2 patch (64 for 16 latent channels), as model_detection gives them.
CHROMA = chroma_config({"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096,
        "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
        "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "patch_size": 2, "in_dim": 64, "out_dim": 3072,
        "hidden_dim": 5120, "n_layers": 5})
CHROMA_TINY = chroma_config({"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64,
        "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
        "hidden_dim": 32, "n_layers": 2})
# Flux.2 [dev]: 128-channel latents (the VAE's 32 in 2x2 patches) taken one position each, 8 double + 48 single
# blocks 6144 wide, context 3 x Mistral Small 3's 5120 (ComfyUI stacks three of its layers' outputs), no pooled.
FLUX2 = flux2_config({"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
        "context_in_dim": 15360, "hidden_size": 6144, "mlp_ratio": 3.0, "num_heads": 48, "depth": 8,
        "depth_single_blocks": 48, "axes_dim": [32, 32, 32, 32], "theta": 2000, "patch_size": 1, "qkv_bias": False,
        "guidance_embed": True, "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
        "default_ref_method": "index", "ref_index_scale": 10.0})
FLUX2_TINY = {**FLUX2, "context_in_dim": 48, "hidden_size": 64, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
              "axes_dim": [8, 8, 8, 8]}
# Qwen-Image: model_detection gives in_channels (16 Wan 2.1 channels in 2x2 patches) and the block count; the rest
# are QwenImageTransformer2DModel's defaults (3072 wide, context Qwen2.5-VL-7B's 3584).
QWEN_IMAGE = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60}
QWEN_IMAGE_TINY = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                   "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
                   "axes_dims_rope": (8, 12, 12)}
# Z-Image (Turbo): NextDiT 3840 wide, 30 layers, context Qwen3-4B's 2560. (0.33's detection also sets allow_fp16
# from the weights' values, which only decides whether fp16 may be used.)
ZIMAGE = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
          "n_layers": 30, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
          "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
          "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
ZIMAGE_TINY = {**ZIMAGE, "dim": 256, "cap_feat_dim": 64, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 8,
               "n_kv_heads": 8, "axes_dims": [8, 12, 12], "multiple_of": 32}
RES = ARGS.resolution or (64 if ARGS.tiny else 1024)
TINY = ARGS.tiny


class Arch(typing.NamedTuple):
    config_class: type      # ComfyUI's model config (comfy.supported_models)
    config: dict
    channels: int           # latent channels
    tokens: int             # context tokens
    width: int              # context width
    pooled: int             # pooled vector width (0: the text encoder gives none)
    downscale: int = 8      # image pixels per latent position
    frames: bool = False    # the VAE's latents have a time axis (Wan 2.1: (C, 1, h, w) per image)
    control: bool = False   # edit pairs: every item has a control latent (Kontext's reference)
    guidance: bool = False  # the built-in node's conditioning carries a guidance value (FluxGuidance)


# Context tokens: Flux's T5 as before; Flux.2's Mistral context is padded to 512 (model_base.Flux2); Chroma's T5,
# Qwen-Image's Qwen2.5-VL and Z-Image's Qwen3 are not padded: 128 stands for a caption of about 90 words.
S = comfy.supported_models
ARCHS = {
    "sdxl": Arch(S.SDXL, SDXL_TINY if TINY else SDXL, 4, 77, 64 if TINY else 2048, 32 if TINY else 1280),
    "sd35l": Arch(S.SD3, SD35L_TINY if TINY else SD35L, 16, 154, 4096, 64 if TINY else 2048),
    "flux": Arch(S.Flux, FLUX_TINY if TINY else FLUX, 16, 512, 64 if TINY else 4096, 32 if TINY else 768,
                 guidance=True),
    "chroma": Arch(S.Chroma, CHROMA_TINY if TINY else CHROMA, 16, 128, 64 if TINY else 4096, 0),
    "flux2": Arch(S.Flux2, FLUX2_TINY if TINY else FLUX2, 128, 512, 48 if TINY else 15360, 0, downscale=16,
                  guidance=True),
    "qwen_image": Arch(S.QwenImage, QWEN_IMAGE_TINY if TINY else QWEN_IMAGE, 16, 128, 64 if TINY else 3584, 0,
                       frames=True),
    "zimage": Arch(S.ZImage, ZIMAGE_TINY if TINY else ZIMAGE, 16, 128, 64 if TINY else 2560, 0),
}
# Flux.1 Kontext [dev]: ComfyUI detects it as Flux-dev (the same config); the control image's latent goes in as a
# reference latent (trainers/arch/flux_kontext.py), doubling the image tokens
ARCHS["kontext"] = ARCHS["flux"]._replace(control=True)
for _name in ("sd35l", "flux", "flux2", "qwen_image"):
    ARCHS[f"{_name}_fp8"] = ARCHS[_name]


@torch.no_grad()
def random_init(module):
    """Normal 0.02 for matrices, zeros for biases, ones otherwise (ComfyUI's layers are created uninitialised)."""
    for n, p in module.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, device=p.device, dtype=torch.float32 if ARGS.tiny else torch.bfloat16) * 0.02)
        else:
            p.fill_(0.0 if n.endswith("bias") else 1.0)
    for n, b in module.named_buffers():
        if n.endswith("pos_embed"):
            # (FP8 buffers of the *_fp8 archs: drawn in fp32, there being no FP8 randn)
            b.copy_(torch.randn(b.shape, device=b.device, dtype=b.dtype if b.dtype.itemsize > 1 else None) * 0.02)


def build(arch):
    """Random-init model as a ModelPatcher: normal 0.02 for matrices, zeros for biases, ones otherwise.
    The *_fp8 archs store the weights as float8_e4m3fn and compute in bf16 (ComfyUI's weight_dtype fp8_e4m3fn)."""
    config_class, config = ARCHS[arch].config_class, ARCHS[arch].config
    mc = config_class(dict(config))
    if arch.endswith("_fp8"):
        mc.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
    else:
        mc.set_inference_dtype(DT, None)
    model = mc.get_model({}, "", device=DEV)
    torch.manual_seed(0)
    random_init(model)
    model.requires_grad_(False)
    if ARGS.channels_last:
        model.diffusion_model.to(memory_format=torch.channels_last)
    return comfy.model_patcher.ModelPatcher(model, load_device=DEV, offload_device=torch.device("cpu"))


def synthetic_data(arch, samples=2, buckets=1):
    """`samples` random latents and captions; with buckets > 1 spread over that many aspect buckets of about
    RES² pixels (square, portrait, landscape, ...). Kontext's items are edit pairs: each has a control latent of
    its latent's shape (LatentSet.controls), as the cache gives them."""
    a = ARCHS[arch]
    g = torch.Generator().manual_seed(0)
    side = RES * 13 // 16 // 64 * 64
    shapes = ([(RES, RES), (side, RES * RES // side // 64 * 64), (RES * RES // side // 64 * 64, side)] if side
              else [(RES, RES), (RES, 2 * RES), (2 * RES, RES)])[:buckets]
    config = DatasetConfig(folder="bench", resolution=RES, min_side=64, max_side=max(RES * 2, 128))
    pairs = (lambda i: dict(control=f"bench/control/{i}.png", control_hash=f"{i + samples:064x}",
                            control_size=shapes[i % buckets])) if a.control else (lambda i: {})
    items = tuple(DatasetItem(path=f"bench/{i}.png", caption="a photo", repeats=1, flip=False,
                              original_size=shapes[i % buckets], bucket=Bucket(*shapes[i % buckets]), crop=(0, 0),
                              content_hash=f"{i:064x}", **pairs(i)) for i in range(samples))

    def latent(item):
        shape = (a.channels, *((1,) if a.frames else ()), item.bucket.height // a.downscale,
                 item.bucket.width // a.downscale)
        return torch.randn(shape, generator=g)
    latents = LatentSet(Dataset(config, "bench", items), tuple(latent(it) for it in items), "bench", 0,
                        controls=tuple(latent(it) for it in items) if a.control else ())
    text = TextSet(tuple((c, TextEmbedding(torch.randn(a.tokens, a.width, generator=g),
                                           torch.randn(a.pooled, generator=g))) for c in ("", "a photo")), "bench", 0)
    return latents, text


def sync():
    if CUDA:
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    mm.soft_empty_cache()


def to_cpu_memory(mp):
    """The model in CPU memory, as ComfyUI leaves it after unloading (the bench builds it on the GPU, unregistered
    with ComfyUI until a run loads it, so unloading alone may leave it there)."""
    mm.unload_all_models()
    mp.model.to(mp.offload_device)
    free()


def builtin_run(mp, arch, steps):
    """ComfyUI's TrainLoraNode for `steps` steps (as gpu_baseline.py calls it): (seconds for the whole call, peak
    GiB, seconds from the call's start to the end of each optimizer step)."""
    import comfy_extras.nodes_train as nt
    a = ARCHS[arch]
    g = torch.Generator().manual_seed(0)
    # as VAE Encode gives them (Qwen-Image's Wan 2.1 VAE: (B, C, 1, h, w))
    shape = (1, a.channels, *((1,) if a.frames else ()), RES // a.downscale, RES // a.downscale)
    lat = torch.randn(shape, generator=g)
    if arch in ("sdxl", "sd35l", "sd35l_fp8", "flux", "flux_fp8"):
        extra = {"pooled_output": torch.randn(1, a.pooled, generator=g), "width": RES, "height": RES,
                 "crop_w": 0, "crop_h": 0, "target_width": RES, "target_height": RES, "guidance": 1.0}
    else:   # as the text encode node gives it (no pooled output but Kontext's CLIP-L), then FluxGuidance
        extra = {"pooled_output": torch.randn(1, a.pooled, generator=g) if a.pooled else None,
                 **({"guidance": 1.0} if a.guidance else {})}
    if a.control:   # ReferenceLatent: the control image's latent
        extra["reference_latents"] = [torch.randn(shape, generator=g)]
    cond = [[torch.randn(1, a.tokens, a.width, generator=g), extra]]
    if hasattr(mp, "cached_patcher_init"):
        # 0.33's node trains a fresh copy from the model's loader (clone(force_deepcopy=True)): here a copy built
        # beforehand and left in CPU memory as a loader leaves it (built on the GPU, where random init is fast),
        # the original moved to CPU memory as ComfyUI would unload it to make room; neither counts in the peak
        fresh = build(arch)
        fresh.model.to(torch.device("cpu"))
        mp.cached_patcher_init = (lambda disable_dynamic=False: fresh, ())
        to_cpu_memory(mp)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    # The node builds its own torch.optim.AdamW and steps it once per optimizer step (TrainSampler.sample): the
    # end of each step is stamped after the GPU finished it, as our runs' steps are.
    step_ends, adamw_step = [], torch.optim.AdamW.step

    def stamped_step(self, *a, **k):
        out = adamw_step(self, *a, **k)
        sync()
        step_ends.append(time.perf_counter() - t)
        return out
    sync()
    t = time.perf_counter()
    torch.optim.AdamW.step = stamped_step
    try:
        # 0.3.75's node needs a list of latents (a single tensor leaves multi_res unbound)
        inputs = dict(model=[mp], latents=[{"samples": lat}, {"samples": lat.clone()}], positive=[cond],
                      batch_size=[1], grad_accumulation_steps=[1], steps=[steps], learning_rate=[1e-4],
                      rank=[16], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                      training_dtype=[PRECISION], lora_dtype=[PRECISION], algorithm=["LoRA"],
                      gradient_checkpointing=[BUILTIN_CHECKPOINTING], existing_lora=["[None]"])
        # the inputs newer ComfyUIs added (0.33), at their defaults but for offloading
        newer = {"quantized_backward": [False], "checkpoint_depth": [1], "offloading": [ARGS.builtin_offloading],
                 "bucket_mode": [False], "bypass_mode": [False]}
        accepted = inspect.signature(nt.TrainLoraNode.execute).parameters
        if ARGS.builtin_offloading and "offloading" not in accepted:
            raise RuntimeError("this ComfyUI's TrainLoraNode has no offloading input")
        nt.TrainLoraNode.execute(**inputs, **{k: v for k, v in newer.items() if k in accepted})
    finally:
        torch.optim.AdamW.step = adamw_step
    sync()
    return time.perf_counter() - t, peak_gib(), step_ends


# the built-in trains once per arch: with gradient checkpointing unless only --variants nogc is timed
BUILTIN_CHECKPOINTING = "gc" in ARGS.variants


def builtin_bench(mp, arch, warmup: int = 3):
    """The built-in node timed as our engine is: the median optimizer step after `warmup` steps, in one call that
    trains warmup + ARGS.steps steps (the model fully loaded: the node loads it with force_full_load). Also
    records what the call costs besides its steps (loading, adapter set-up, unpatching), which the earlier
    method (the difference of two calls of 2 and 6 steps, divided by 4) counted as steps when it varied between
    the calls."""
    total, peak, ends = builtin_run(mp, arch, warmup + ARGS.steps)
    steps = [b - a for a, b in zip(ends, ends[1:])][warmup - 1:]
    median = statistics.median(steps)
    return {"builtin_s_per_step": median, "builtin_peak_gib": peak, "builtin_step_s": steps,
            "builtin_first_step_end_s": ends[0], "builtin_call_s": total,
            "builtin_outside_steps_s": total - ends[0] - sum(b - a for a, b in zip(ends, ends[1:]))}


def engine_bench(mp, latents, text, checkpointing: bool, batch: int, steps: int, adapter: str = "lora",
                 compile: str = "cuda_graphs", fraction: float = 1.0, warmup: int = 3, budget: float = 0.0,
                 optimizer: str = "adamw", profile_label: str = "step"):
    """Median seconds per optimizer step, peak GiB of our TrainingRun, the GPU memory allocated before the
    run and after it (the run unloaded, then the model loaded again: equal when a run leaks nothing), and
    the seconds from starting the run to the end of its first step and of its warm-up (with CUDA graphs the
    last warm-up step is the one that captures)."""
    settings = TrainingSettings(optimizer=optimizer, learning_rate=1e-4, batch_size=batch, precision=PRECISION,
                                gradient_checkpointing=checkpointing, compile=compile, checkpoint_fraction=fraction,
                                recompute_attention=ARGS.recompute_attention, memory_budget_gb=budget,
                                recompute_layers=not ARGS.keep_layers, optimizer_offload=ARGS.optimizer_offload,
                                fp8_compute=ARGS.fp8_compute, seed=ARGS.train_seed)
    kind, dora = ("lora", True) if adapter == "dora" else (adapter, False)
    state = new_adapter(make_spec(mp, kind, 16, 16.0, "attention_mlp", 0, "fp32", dora=dora), mp)
    if budget:
        # as a user's model is before Train steps: in CPU memory (ComfyUI's loaders leave it there), so that the
        # run's own load decides what goes to the GPU
        to_cpu_memory(mp)
    free()
    before = torch.cuda.memory_allocated() / 2**30 if CUDA else 0.0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    run = trained = None
    try:
        # as trainers.loop.train runs it
        with torch.inference_mode(False), torch.enable_grad(), engine_loop.long_lived_objects_frozen(), training_mode():
            sync()
            start = time.perf_counter()
            tracked = {"frozen": gc.get_freeze_count(), "start": len(gc.get_objects())}
            run = TrainingRun(mp, state, latents, text, settings, end_step=warmup + steps, world=WORLD)
            tracked["run_built"] = len(gc.get_objects())
            times = []
            gc.callbacks.append(_gc_timer)
            # A step is timed as the built-in node's are: from the end of the step before to its own end. Its end is
            # when it returns: it has read its loss, so its device work is done (train()'s loop queues the next
            # step's micro-batches before that read, step(ahead=True), as here unless --one-at-a-time).
            ended = start
            for i in range(warmup + steps):
                if i == warmup:
                    load_peak = peak_gib()     # including the load (on an H200 the whole model, then unloaded to
                    if CUDA:                   # the budget; a smaller card's ComfyUI loads only what fits)
                        torch.cuda.reset_peak_memory_stats()
                    gc_pauses.clear()      # only the timed steps' collections
                    full_collections.clear()
                    tracked["warmed_up"] = len(gc.get_objects())
                _gc_started["step"] = i
                run.step(ahead=i < warmup + steps - 1 and not ARGS.one_at_a_time)
                before, ended = ended, time.perf_counter()
                if i == 0:
                    first_step = ended - start
                if i == warmup - 1:
                    warmed_up = ended - start
                if i >= warmup:
                    times.append(ended - before)
            sync()
            gc.callbacks.remove(_gc_timer)
            tracked["end"] = len(gc.get_objects())
            log(f"Python objects the collector tracks (not frozen): {tracked}; full collections: {full_collections}")
            if ARGS.profile:
                profile_step(run, profile_label)
        steps_peak = peak_gib()
        peak = max(steps_peak, load_peak)      # the whole run, as recorded before 2026-12-03 (session 2)
        trained = run.export() if ARGS.gradient_cosine and ARGS.fp8_compute else None
        RUN_DETAILS.append({"steps_peak_gib": steps_peak, "losses": list(run.losses) if ARGS.record_losses else None,
                            "streamed_layers": len(streamed_layers(run.base_model.diffusion_model)),
                            "resident_gib": None if run.resident is None else run.resident / 2**30})
    finally:
        mm.unload_all_models()      # while the run's clone lives, so its object patches are taken off
        del run
        free()
    mm.load_models_gpu([mp], force_full_load=True)
    free()
    after = torch.cuda.memory_allocated() / 2**30 if CUDA else 0.0
    if trained is not None:
        RUN_DETAILS[-1]["gradient_cosine"] = gradient_cosine(mp, trained, latents, text, settings)
        log(f"one batch's adapter gradients, FP8 compute against bf16: {RUN_DETAILS[-1]['gradient_cosine']}")
    STEP_TIMES.append((times, list(gc_pauses), list(full_collections)))
    return statistics.median(times), peak, before, after, first_step, warmed_up


def gradient_cosine(mp, trained, latents, text, settings) -> dict:
    """The trained adapter's gradients on one micro-batch (the same latents, noise and timesteps: each run starts
    from the same seed), with FP8 compute and without, eager: their cosine similarity over all parameters, the
    lowest per layer and the ratio of their norms."""
    gradients = {}
    for fp8 in (True, False):
        with torch.inference_mode(False), torch.enable_grad(), training_mode():
            run = TrainingRun(mp, trained, latents, text,
                              dataclasses.replace(settings, fp8_compute=fp8, compile="off"), end_step=1, world=WORLD)
            try:
                _, grads = run._loss_and_gradients(run._micro_batch())
                gradients[fp8] = [g.detach().float().flatten() for g in grads]
            finally:
                mm.unload_all_models()
                del run
                free()
    def cosine(a, b):      # in fp64, without cosine_similarity's clamp of small norms
        a, b = a.double(), b.double()
        return (a @ b / (a.norm() * b.norm())).item()
    on, off = torch.cat(gradients[True]), torch.cat(gradients[False])
    # tensors whose bf16 gradient is more than 1e-4 of the whole's norm (LoRA's down projections are ~0 early on)
    per_tensor = [cosine(a, b) for a, b in zip(gradients[True], gradients[False]) if b.norm() > 1e-4 * off.norm()]
    mm.load_models_gpu([mp], force_full_load=True)
    return {"all": cosine(on, off), "lowest_tensor": min(per_tensor), "tensors": len(per_tensor),
            "norm_ratio": (on.norm() / off.norm()).item()}


KERNEL_KINDS = (   # (kind, substrings of the kernel's name), first match wins
    ("fused", ("geglu_", "group_norm_")),                     # trainers/fused.py's Triton kernels
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("layout", ("nchwToNhwc", "nhwcToNchw", "transpose", "Transpose")),
    ("conv", ("conv", "implicit_gemm", "fprop", "dgrad", "wgrad", "xmma_", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_", "cublas", "splitK")),
    ("norm", ("group_norm", "GroupNorm", "layer_norm", "LayerNorm", "RowwiseMoments", "ComputeFused",
              "norm")),
    ("foreach", ("multi_tensor", "foreach")),
    ("reduce", ("reduce", "Reduce")),
    ("copy/cat", ("copy", "Copy", "CatArray", "cat_")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "Elementwise")),
)


def kernel_kind(name):
    return next((kind for kind, keys in KERNEL_KINDS if any(k in name for k in keys)), "other")


STEP_TIMES = []   # each engine run's timed steps, in seconds, and its Python garbage collections
RUN_DETAILS = []  # each engine run's peak over its timed steps only, and what memory_budget_gb streamed
gc_pauses = []    # (generation, ms) of each collection of the cyclic garbage collector during a run
full_collections = []   # each full (generation 2) collection during the timed steps: step, ms, objects walked
_gc_started = {}


def _gc_timer(phase, info):
    if phase == "start":
        if info["generation"] == 2:     # what a full collection walks: every tracked object not frozen
            _gc_started["objects"] = len(gc.get_objects())
        _gc_started["t"] = time.perf_counter()
    elif "t" in _gc_started:
        ms = (time.perf_counter() - _gc_started.pop("t")) * 1e3
        gc_pauses.append((info["generation"], ms))
        if info["generation"] == 2:
            full_collections.append({"step": _gc_started.get("step"), "ms": round(ms, 1),
                                     "objects": _gc_started.pop("objects", None), "collected": info["collected"],
                                     "frozen": gc.get_freeze_count()})


def profile_step(run, label="step"):
    """GPU kernel time of one step by kernel (the same kernels a graph replays), and the total: the step's
    floor once the host is out of the way. The whole table goes to --out as profile_<label>.txt."""
    from eridiffusion.trainers.graphs import EagerMicroBatches
    from torch.profiler import ProfilerActivity, profile
    graphed = run.micro_batches
    run.micro_batches = EagerMicroBatches(run._loss_and_gradients)
    run.step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                 with_stack=True) as prof:
        run.step()
        sync()
    run.micro_batches = graphed
    by_op = kernels_by_launching_op(prof)

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(device_us(e) for e in events) / 1e3
    count = sum(e.count for e in events)
    lines = [f"{label}: GPU kernel time of one eager step: {total:.1f} ms in {count} kernels"]
    kinds = {}
    for e in events:
        k = kinds.setdefault(kernel_kind(e.key), [0.0, 0])
        k[0] += device_us(e) / 1e3
        k[1] += e.count
    lines += [f"  {kind:12s} {ms:8.2f} ms {n:6d} kernels" for kind, (ms, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])]
    for e in sorted(events, key=lambda e: -device_us(e))[:30]:
        lines.append(f"  {device_us(e) / 1e3:8.2f} ms {e.count:6d}x  [{kernel_kind(e.key)}] {e.key[:120]}")
    log("\n".join(lines))
    if MAIN:
        os.makedirs(ARGS.out, exist_ok=True)
        with open(os.path.join(ARGS.out, f"profile_{label}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n\nall kernels:\n")
            for e in sorted(events, key=lambda e: -device_us(e)):
                f.write(f"{device_us(e) / 1e3:9.3f} ms {e.count:6d}x [{kernel_kind(e.key)}] {e.key}\n")
            f.write("\nby launching op (kernel kind, op, the backward node it ran in or 'forward', input shapes):\n")
            f.writelines(by_op)


def kernels_by_launching_op(prof, top=200):
    """Kernel time grouped by the op that launched it, the autograd node it ran under and its input shapes: which
    statement of the model a kernel belongs to (the kernel table alone says only what kind of kernel it is)."""
    groups = {}
    for e in prof.events():
        kernels = getattr(e, "kernels", None)
        if not kernels:
            continue
        node, parent = "forward", e.cpu_parent
        while parent is not None:
            if parent.name.startswith("autograd::engine::evaluate_function: "):
                node = parent.name.split(": ", 1)[1]
                break
            parent = parent.cpu_parent
        shapes = str(getattr(e, "input_shapes", ""))[:160]
        frame = next((f for f in (getattr(e, "stack", None) or []) if "comfy" in f or "trainers" in f), "")
        if frame:
            shapes += " @ " + frame.rsplit("/", 2)[-1]
        for k in kernels:
            g = groups.setdefault((kernel_kind(k.name), e.name, node, shapes), [0.0, 0])
            g[0] += k.duration / 1e3
            g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [f"{ms:8.2f} ms {n:5d}x [{kind}] {op} in {node} {shapes}\n" for (kind, op, node, shapes), (ms, n) in rows]


def queue_bench(mp, arch, steps=24, dtype=None):
    """From loading the diffusion model's file to the first step and to the first step replayed as a graph:
    the part of Queue → first step that training adds once latents and captions are cached (their caches are
    on disk after the first run). The file is freshly written, so it is read from the page cache."""
    import comfy.sd
    import safetensors.torch
    path = "/tmp/eri_bench_unet.safetensors"
    if not os.path.exists(path):
        safetensors.torch.save_file({k: v.contiguous() for k, v in mp.model.diffusion_model.state_dict().items()},
                                    path)
    to_cpu_memory(mp)     # the peak below is the loaded file's, not the built model's too
    latents, text = synthetic_data(arch, samples=6, buckets=3)
    settings = TrainingSettings(optimizer="adamw", learning_rate=1e-4, precision="auto")   # the node's default
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    sync()
    if ARGS.dynamic_vram:
        # the rest of main.py's dynamic VRAM start, only now: with it ComfyUI's layers are created without weights,
        # to be assigned from a file, so build() must run before it
        import comfy.memory_management
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    start = time.perf_counter()
    model = comfy.sd.load_diffusion_model(path, model_options={"dtype": dtype} if dtype else {})
    loaded = time.perf_counter() - start
    loaded_dtype = str(model.model.get_dtype()).removeprefix("torch.")
    patcher_class = type(model).__name__
    state = new_adapter(make_spec(model, "lora", 16, 16.0, "attention_mlp", 0, "fp32"), model)
    marks, times, captured_at = [], [], None
    with torch.inference_mode(False), torch.enable_grad(), engine_loop.long_lived_objects_frozen(), training_mode():
        run = TrainingRun(model, state, latents, text, settings, end_step=steps)
        shapes = []
        for i in range(steps):
            item = latents.dataset.items[run.order.batch(run.cursor)[0]]
            shapes.append(f"{item.bucket.width}x{item.bucket.height}")
            t = time.perf_counter()
            run.step()
            sync()
            times.append(time.perf_counter() - t)
            marks.append(time.perf_counter() - start)
            if captured_at is None and getattr(run.micro_batches, "captures", 0) == 3:
                captured_at = marks[-1]
        captures = getattr(run.micro_batches, "captures", 0)
        peak = peak_gib()
        if ARGS.profile:
            profile_step(run, f"queue_{loaded_dtype}")
    run_precision = run.precision
    mm.unload_all_models()
    del run, model
    free()
    rec = {"model_dtype": loaded_dtype, "precision": run_precision, "patcher": patcher_class, "load_s": loaded, "first_step_s": marks[0],
           "buckets": 3, "graphs_captured": captures, "all_buckets_captured_s": captured_at,
           "steady_s_per_step": statistics.median(times[-8:]), "peak_gib": peak, "steps": steps,
           "step_s": times, "step_bucket": shapes}
    log(f"{arch} queue ({loaded_dtype} as loaded by a {patcher_class}, precision {run_precision}): model file loaded in {loaded:.1f} s, "
        f"first step at {marks[0]:.1f} s, {captures} graphs for 3 buckets, {statistics.median(times[-8:]):.4f} s/step after, peak {peak:.2f} GiB")
    return rec


def commit():
    # The GPU machine's copy of the tree may carry a stale .git: the caller names the commit there.
    if os.environ.get("ERI_COMMIT"):
        return os.environ["ERI_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return os.environ.get("ERI_COMMIT", "unknown")


DONE_RECORDS = []   # earlier archs' records of this process


def save_partial(records):
    """Every finished run's record, rewritten after each run: a process stopped by a time limit keeps what it
    measured (train_bench.json is only written at the end)."""
    if MAIN and not ARGS.fresh:
        os.makedirs(ARGS.out, exist_ok=True)
        with open(os.path.join(ARGS.out, "train_bench.partial.json"), "w") as f:
            json.dump(DONE_RECORDS + records, f, indent=1)


def bench_arch(arch, card):
    t = time.perf_counter()
    mp = build(arch)
    nparams = sum(p.numel() for p in mp.model.diffusion_model.parameters())
    log(f"built {arch}, {nparams / 1e9:.3f} B parameters, in {time.perf_counter() - t:.1f} s")
    latents, text = synthetic_data(arch, samples=max(2, max(ARGS.batch) * (WORLD.size if WORLD else 1)))

    base = {"arch": arch, "resolution": RES, "card": card, "gpus": WORLD.size if WORLD else 1,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
            "torch": torch.__version__, "sdpa": ARGS.sdpa, "fused_lora": not ARGS.no_fused_lora,
            "gc_freeze": not ARGS.no_gc_freeze, "fused_geglu": not ARGS.no_fused_geglu,
            "fused_group_norm": not ARGS.no_fused_group_norm, "fused_rope": not ARGS.no_fused_rope,
            "fused_gelu": not ARGS.no_fused_gelu, "fused_rms_norm": not ARGS.no_fused_rms_norm,
            "fused_concat": not ARGS.no_fused_concat, "contiguous_blocks": not ARGS.no_contiguous_blocks,
            "kept_projections": not ARGS.no_kept_projections, "adopted_gradients": not ARGS.copy_gradients,
            "fp8_compute": ARGS.fp8_compute}
    records = []
    # The built-in node runs after ours: it leaves its adapters' weight functions on the shared model's layers and
    # the model in train mode (ComfyUI 0.3.75; seen on the CPU after unload_all_models; a later full load on the
    # GPU wipes the functions), and our runs timed right after it were 8-30 % slower on 2 of 3 machines.
    runs = [(a, v, b, c, f, m, o) for a in ARGS.adapter for v in ARGS.variants for b in ARGS.batch
            for c in ARGS.compile for f in (ARGS.fraction if v == "gc" else [1.0]) for m in ARGS.memory_budget_gb
            for o in ARGS.optimizer] if not (ARGS.builtin_only or ARGS.queue_only) else []
    for adapter, variant, batch, compile, fraction, budget, optimizer in runs:
        label = (f"{adapter}_r16_{variant}" + (f"{fraction:g}" if fraction < 1 else "")
                 + (f"_sdpa-{'-'.join(ARGS.sdpa)}" if ARGS.sdpa else "") + ("_unfused" if ARGS.no_fused_lora else "")
                 + ("_gc-unfrozen" if ARGS.no_gc_freeze else "") + ("_eager-geglu" if ARGS.no_fused_geglu else "")
                 + ("_eager-group-norm" if ARGS.no_fused_group_norm else "")
                 + ("_eager-rope" if ARGS.no_fused_rope else "") + ("_eager-gelu" if ARGS.no_fused_gelu else "")
                 + ("_eager-rms" if ARGS.no_fused_rms_norm else "")
                 + ("_fp8" if ARGS.fp8_compute else "")
                 + ("_ra" if ARGS.recompute_attention and variant == "gc" else "")
                 + ("_kl" if ARGS.keep_layers and variant == "gc" else "")
                 + ("_gradcopy" if ARGS.copy_gradients else "") + ("_one-at-a-time" if ARGS.one_at_a_time else "")
                 + ("_graphs" if compile == "cuda_graphs" else "") + (f"_budget{budget:g}" if budget else "")
                 + (f"_{optimizer}" if optimizer != "adamw" else "") + ("_optoffload" if ARGS.optimizer_offload else ""))
        rec = {**base, "variant": label, "compile": compile, "checkpoint_fraction": fraction if variant == "gc" else 0,
               "recompute_attention": ARGS.recompute_attention, "recompute_layers": not ARGS.keep_layers,
               "steps_queued_ahead": not ARGS.one_at_a_time,
               "memory_budget_gb": budget, "batch": batch,
               "optimizer": optimizer, "optimizer_offload": ARGS.optimizer_offload,
               "s_per_step": None, "peak_gib": None, "ratio": None}
        try:
            (rec["s_per_step"], rec["peak_gib"], rec["gpu_gib_before_run"], rec["gpu_gib_after_run_and_unload"],
             rec["first_step_s"], rec["warmed_up_s"]) = engine_bench(mp, latents, text, variant == "gc", batch,
                                                                    ARGS.steps, adapter, compile, fraction,
                                                                    budget=budget, optimizer=optimizer,
                                                                    profile_label=f"{arch}_{label}_b{batch}")
            rec["step_s"], pauses, rec["full_collections"] = STEP_TIMES[-1]
            rec.update(RUN_DETAILS[-1])
            rec["python_gc"] = {f"gen{g}": {"collections": sum(1 for q, _ in pauses if q == g),
                                            "ms": sum(ms for q, ms in pauses if q == g)} for g in (0, 1, 2)}
            rec["images_per_s"] = batch * (WORLD.size if WORLD else 1) / rec["s_per_step"]
            log(f"{arch} {rec['variant']} batch {batch}: {rec['s_per_step']:.4f} s/step, "
                f"peak {rec['peak_gib']:.2f} GiB (timed steps {rec['steps_peak_gib']:.2f}; {rec['streamed_layers']} "
                f"layers streamed), allocated before {rec['gpu_gib_before_run']:.3f} / after "
                f"{rec['gpu_gib_after_run_and_unload']:.3f} GiB; first step after {rec['first_step_s']:.1f} s, "
                f"warm-up done after {rec['warmed_up_s']:.1f} s")
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            log(f"{arch} {rec['variant']} batch {batch} failed:", rec["error"])
            mm.unload_all_models()
            free()
        records.append(rec)
        save_partial(records)
    builtin = {"builtin_s_per_step": None, "builtin_peak_gib": None}
    if not ARGS.no_builtin and WORLD is None:
        try:
            builtin = {**builtin_bench(mp, arch), "builtin_offloading": ARGS.builtin_offloading,
                       "builtin_gradient_checkpointing": BUILTIN_CHECKPOINTING}
            log(f"{arch} builtin TrainLoraNode: {builtin['builtin_s_per_step']:.4f} s/step (median of "
                f"{len(builtin['builtin_step_s'])} after 3 warm-up steps), peak {builtin['builtin_peak_gib']:.2f} "
                f"GiB; first step done {builtin['builtin_first_step_end_s']:.1f} s into the call, "
                f"{builtin['builtin_outside_steps_s']:.1f} s after its last; steps "
                + " ".join(f"{x:.3f}" for x in builtin["builtin_step_s"]))
        except Exception as e:
            builtin["builtin_error"] = f"{type(e).__name__}: {e}"
            log(f"{arch} builtin TrainLoraNode failed:", builtin["builtin_error"])
        mm.unload_all_models()
        free()
    if ARGS.builtin_only:
        records.append({**base, "variant": "builtin_only", "batch": 1, "s_per_step": None, "peak_gib": None,
                        "ratio": None})
    for rec in records:
        rec.update(builtin)
        if rec["builtin_s_per_step"] and rec["s_per_step"] and rec["batch"] == 1:
            rec["ratio"] = rec["builtin_s_per_step"] / rec["s_per_step"]
    if ARGS.queue and WORLD is None:
        for dtype in ({"auto": None, "bf16": torch.bfloat16}[d] for d in ARGS.queue_dtype):
            try:
                records.append({**base, "variant": "queue_to_first_step", **queue_bench(mp, arch, dtype=dtype)})
            except Exception as e:
                log(f"{arch} queue bench (dtype {dtype}) failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                records.append({**base, "variant": "queue_to_first_step", "model_dtype": str(dtype),
                                "error": f"{type(e).__name__}: {e}"})
                mm.unload_all_models()
                free()
            save_partial(records)
        if os.path.exists("/tmp/eri_bench_unet.safetensors"):
            os.remove("/tmp/eri_bench_unet.safetensors")
    del mp
    free()
    return records


def fresh_sides():
    """Our engine and the built-in node, each in a process of its own, merged: the built-in's figures go into our
    records of the same arch (a process that ran one side leaves nothing behind for the other)."""
    argv = [a for a in sys.argv[1:] if a != "--fresh"]
    sides = {}
    for side in ("--no-builtin", "--builtin-only"):
        out = Path(ARGS.out) / side.strip("-")
        subprocess.run([sys.executable, __file__, *argv, side, "--out", str(out)], check=True)
        sides[side] = json.loads((out / "train_bench.json").read_text())
    records = sides["--no-builtin"]
    builtins = {r["arch"]: r for r in sides["--builtin-only"]}
    for rec in records:
        if "batch" not in rec or rec["arch"] not in builtins:
            continue
        rec.update({k: v for k, v in builtins[rec["arch"]].items() if k.startswith("builtin")})
        rec["builtin_process"] = "fresh"
        if rec["builtin_s_per_step"] and rec["s_per_step"] and rec["batch"] == 1:
            rec["ratio"] = rec["builtin_s_per_step"] / rec["s_per_step"]
    return records


JOB_CONFIGS = {"sdxl": "sdxl_lora.yaml", "sd35l": "sd35_lora.yaml"}


def write_job(arch: str, folder: Path, steps: int) -> Path:
    """--write-job: a checkpoint file of random weights as ComfyUI's CheckpointSave writes one (the model as
    build() makes it; CLIP-L/G and the VAE, full size, initialised as it initialises the model: no T5 for SD 3.5),
    8 images with captions, and configs/<arch>_lora.yaml pointed at them: saves and samples at half the steps and
    at the end, AdamW, bf16 (--tiny: fp32 on the CPU, 64 px, ComfyUI's loader to be told TINY_CLIP)."""
    import comfy.sd
    import numpy as np
    import yaml
    from PIL import Image
    from comfy.ldm.models.autoencoder import AutoencoderKL
    if arch not in JOB_CONFIGS:
        raise SystemExit(f"--write-job: --arch {' or '.join(JOB_CONFIGS)} (a checkpoint file with its text encoders)")
    folder.mkdir(parents=True, exist_ok=True)
    model = build(arch)
    config = ARCHS[arch].config_class(dict(ARCHS[arch].config))
    # the keys by which clip_target finds text encoders in a checkpoint (SD 3.5's): CLIP-L and G, no T5
    present = {f"{config.text_encoder_key_prefix[0]}{name}.transformer.text_model.final_layer_norm.weight": None
               for name in ("clip_l", "clip_g")}
    tiny_encoders = {}
    if TINY:    # the tests' tiny text encoders, which their tiny_cli.py tells ComfyUI's checkpoint loader about
        spec = importlib.util.spec_from_file_location("tiny_models", ROOT / "tests/eri_test_nodes/tiny_models.py")
        tiny_models = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny_models)
        tiny_encoders = {"clip_l_model_config": dict(tiny_models.TINY_CLIP),
                         "clip_g_model_config": dict(tiny_models.TINY_CLIP)}
    clip = comfy.sd.CLIP(target=config.clip_target(present), model_options=tiny_encoders)
    random_init(clip.cond_stage_model)
    # ComfyUI's VAE as comfy.sd.VAE builds it for SDXL's (4 channels) and SD 3.5's (16) state dicts
    autoencoder = AutoencoderKL(embed_dim=ARCHS[arch].channels, ddconfig={
        "double_z": True, "z_channels": ARCHS[arch].channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0})
    random_init(autoencoder)
    vae = comfy.sd.VAE(sd={k: v.float() for k, v in autoencoder.state_dict().items()})
    checkpoint = folder / f"random_{arch}.safetensors"
    comfy.sd.save_checkpoint(str(checkpoint), model, clip, vae)
    images = folder / "images"
    images.mkdir(exist_ok=True)
    generator = np.random.default_rng(0)
    for i in range(8):
        pixels = generator.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"[trigger] photo number {i}")
    job = yaml.safe_load((ROOT / "configs" / JOB_CONFIGS[arch]).read_text())
    process = job["config"]["process"][0]
    process.update(device="cpu" if TINY or not CUDA else "cuda:0", training_folder=str(folder / "output"))
    process["model"]["name_or_path"] = checkpoint.name      # relative to the job file
    process["datasets"] = [{**process["datasets"][0], "folder_path": "images", "resolution": [RES],
                            "caption_dropout_rate": 0.1}]
    process["train"].update(steps=steps, optimizer="adamw", dtype=PRECISION, gradient_checkpointing=True,
                            lr=1e-4)
    process["save"].update(save_every=max(1, steps // 2), max_step_saves_to_keep=2)
    process["sample"].update(sample_every=max(1, steps // 2), width=RES, height=RES, sample_steps=4,
                             prompts=["[trigger] in snow"])
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    log(f"wrote {checkpoint} ({checkpoint.stat().st_size / 2**30:.2f} GiB), {images}, {path}")
    return path


def main():
    if ARGS.write_job:
        write_job(ARGS.arch[0], Path(ARGS.write_job), ARGS.steps)
        return
    card = torch.cuda.get_device_name() if CUDA else "cpu"
    log(f"device {DEV} ({card}), torch {torch.__version__}, dtype {DT}, resolution {RES}, tiny={ARGS.tiny}")
    records = []
    if ARGS.fresh:
        records = fresh_sides()
    else:
        for arch in ARGS.arch:
            records += bench_arch(arch, card)
            DONE_RECORDS[:] = records

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    log("\n| arch | variant | batch | res | s/step | peak GiB | builtin s/step | builtin peak GiB | ratio | card |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in records if "batch" in r):
        log(f"| {r['arch']} | {r['variant']} | {r['batch']} | {r['resolution']} | {fmt(r['s_per_step'], '.4f')} "
            f"| {fmt(r['peak_gib'], '.2f')} "
            f"| {fmt(r['builtin_s_per_step'], '.4f')} | {fmt(r['builtin_peak_gib'], '.2f')} "
            f"| {fmt(r['ratio'], '.2f')} | {r['card']} |")
    if not MAIN:
        return
    os.makedirs(ARGS.out, exist_ok=True)
    path = os.path.join(ARGS.out, "train_bench.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    log(f"\nwrote {path}")
    partial = os.path.join(ARGS.out, "train_bench.partial.json")
    if os.path.exists(partial):
        os.remove(partial)
    for r in records:
        if r["variant"] == "queue_to_first_step" and "step_s" in r:
            log(f"queue {r['arch']}: " + ", ".join(f"{b} {t:.3f}" for b, t in zip(r["step_bucket"], r["step_s"])))


if __name__ == "__main__":
    main()
