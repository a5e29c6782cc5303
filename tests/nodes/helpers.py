"""Running the pack's nodes in-process the way ComfyUI's executor does (under torch.inference_mode)."""
from __future__ import annotations

import torch

from conftest import write_images


def run(node_cls, **inputs):
    """Execute a V3 node as ComfyUI does and return its output values."""
    with torch.inference_mode():
        return node_cls.execute(**inputs).result


def settings(**overrides):
    from eridiffusion.nodes.train import EriTrainingSettings
    values = dict(optimizer="adamw", learning_rate=1e-3, schedule="constant", warmup_steps=0, total_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, batch_size=1, grad_accumulation=1, precision="fp32",
                  gradient_checkpointing=False, seed=0, noise_offset=0.0, min_snr_gamma=0.0, caption_dropout=0.0)
    values.update(overrides)
    return run(EriTrainingSettings, **values)[0]


def prepared(folders, tiny, arch="sdxl", sizes=((64, 64),) * 4, write=True, **dataset_kw):
    """Images in ComfyUI's input folder (write False: those already in input/set) -> dataset, latents, captions,
    a tiny MODEL and a fresh adapter."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents, EriTrainingImages
    if write:
        write_images(folders["input"] / "set", sizes)
    kw = dict(folder="set", resolution=64, trigger_word="", default_caption="", flip=False, min_side=64,
              max_side=128, max_upscale=1.0)
    kw.update(dataset_kw)
    dataset = run(EriTrainingImages, **kw)[0]
    with torch.inference_mode(False):
        model, clip, vae = tiny.tiny_model(arch), tiny.tiny_clip(arch), tiny.tiny_vae(arch)
    latents = run(EriCacheLatents, dataset=dataset, vae=vae, batch_size=4)[0]
    captions = run(EriCacheCaptions, dataset=dataset, clip=clip)[0]
    adapter = run(EriCreateAdapter, model=model, adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp",
                  seed=0, dtype="fp32")[0]
    return dict(dataset=dataset, latents=latents, captions=captions, model=model, clip=clip, vae=vae,
                adapter=adapter)


def with_reg(p, folders, count=2, sizes=None):
    """p's training images combined with regularisation images (`count` of 64x64, or of `sizes`), cached again."""
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents, EriCombineImages, EriTrainingImages
    write_images(folders["input"] / "reg", sizes or ((64, 64),) * count, seed=1, prefix="reg")
    reg = run(EriTrainingImages, folder="reg", resolution=64, trigger_word="", default_caption="", flip=False,
              min_side=64, max_side=128, max_upscale=1.0, is_reg=True)[0]
    dataset = run(EriCombineImages, dataset_1=p["dataset"], dataset_2=reg)[0]
    latents = run(EriCacheLatents, dataset=dataset, vae=p["vae"], batch_size=4)[0]
    captions = run(EriCacheCaptions, dataset=dataset, clip=p["clip"])[0]
    return {**p, "dataset": dataset, "latents": latents, "captions": captions}


def train(p, steps, adapter=None, **setting_overrides):
    """Train steps' model, adapter and loss outputs (without sampling)."""
    from eridiffusion.nodes.train import EriTrainSteps
    return run(EriTrainSteps, model=p["model"], adapter=adapter or p["adapter"], latents=p["latents"],
               captions=p["captions"], settings=settings(**setting_overrides), steps=steps)[:3]


def assert_chained_and_resumed_equal_one_run(p, steps, prefix, **options):
    """Training `steps` in one run, in two chained halves, and in two halves resumed from the first half's saved
    files give the same losses and weights, bit for bit."""
    from eridiffusion.nodes.adapter import EriLoadAdapter, EriSaveAdapter
    _, once, _ = train(p, steps, **options)
    _, half, _ = train(p, steps // 2, **options)
    name = run(EriSaveAdapter, adapter=half, filename_prefix=prefix, save_dtype="fp16")[0]
    _, chained, _ = train(p, steps - steps // 2, adapter=half, **options)
    _, resumed, _ = train(p, steps - steps // 2, adapter=run(EriLoadAdapter, lora_name=name)[0], **options)
    for other in (chained, resumed):
        assert other.history.losses == once.history.losses
        assert all(torch.equal(once.weights[k], other.weights[k]) for k in once.weights)


def model_output(model_patcher, p, seed=123, inference_mode=True, load=None):
    """The MODEL's prediction (ComfyUI's apply_model, as samplers call it) on fixed inputs; under
    torch.inference_mode as ComfyUI samples, or (inference_mode False) under no_grad only. `load` puts the
    MODEL on its device and returns a context that holds it there (default: load_models_gpu, as samplers
    do)."""
    import comfy.model_management
    import comfy.model_sampling
    base = model_patcher.model
    gen = torch.Generator().manual_seed(seed)
    frames = (1,) if base.latent_format.latent_dimensions == 3 else ()    # Qwen-Image's latents: (B, C, T, h, w)
    x = torch.randn(2, base.latent_format.latent_channels, *frames, 8, 8, generator=gen)
    flow = isinstance(base.model_sampling, comfy.model_sampling.CONST)
    sigma = torch.tensor([0.3, 0.8]) if flow else torch.tensor([1.5, 7.0])
    text = p["captions"].embeddings[1][1]
    cond = dict(c_crossattn=text.context.unsqueeze(0).repeat(2, 1, 1))
    if type(base).__name__ != "QwenImage":    # Qwen-Image takes the context alone
        cond.update(y=base.encode_adm(pooled_output=text.pooled.unsqueeze(0).repeat(2, 1), width=64, height=64),
                    guidance=torch.tensor([1.0, 1.0]))   # per sample (Chroma needs one each)
    if type(base).__name__ == "Lumina2":    # Z-Image: extra_conds' num_tokens (its unpadded caption's length)
        cond["num_tokens"] = text.context.shape[0]
    device = model_patcher.load_device     # (the GPU tests': on the CPU these stay where they are)
    x, sigma = x.to(device), sigma.to(device)
    cond = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    with torch.inference_mode() if inference_mode else torch.no_grad():
        if load is None:
            comfy.model_management.load_models_gpu([model_patcher])
            return base.apply_model(x, sigma, **cond).clone()
        with load(model_patcher):
            return base.apply_model(x, sigma, **cond).clone()


def fixed_loss(model_patcher, p, seed=7, settings=None):
    """Mean training loss of a MODEL over the whole dataset at fixed timesteps and noise; of the loss type of
    `settings` (TrainingSettings; default MSE)."""
    import comfy.model_management
    import comfy.model_sampling
    from eridiffusion.trainers.arch import Batch, detect, latents_in
    from eridiffusion.trainers.config import TrainingSettings
    from eridiffusion.trainers.losses import elementwise_loss, huber_threshold
    settings = settings or TrainingSettings()
    arch = detect(model_patcher)
    base = model_patcher.model
    ms = base.model_sampling
    flow = isinstance(ms, comfy.model_sampling.CONST)
    gen = torch.Generator().manual_seed(seed)
    items = list(p["latents"].dataset.items)
    x0 = latents_in(base, torch.stack(list(p["latents"].latents)))
    total = 0.0
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model_patcher])
        for t in (0.05, 0.25, 0.5, 0.75, 0.95):
            noise = torch.randn(x0.shape, generator=gen)
            sigma = torch.full((len(items),), t) if flow else ms.sigmas[torch.full((len(items),), int(t * 1000))]
            batch = Batch(x0, [p["captions"].get(i.caption) for i in items], items)
            pred = arch.predict(base, ms, arch.noisy(ms, x0, noise, sigma), sigma, batch, settings)
            threshold = huber_threshold(settings, *arch.noise_levels(ms, sigma))
            total += elementwise_loss(pred, arch.target(ms, x0, noise, sigma), settings, threshold).mean().item()
    return total / 5
