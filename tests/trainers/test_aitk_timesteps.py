"""A YAML job trains at the noise levels ai-toolkit trains at: for each train.timestep_type and model, the σ we
draw has the median and quartiles of ai-toolkit's draw. ai-toolkit's draw is written out here from its source
(github.com/ostris/ai-toolkit, commit 27a03a9), not from ours:

- jobs/process/BaseSDTrainProcess.py: flow-matching jobs call noise_scheduler.set_train_timesteps(1000,
  timestep_type=...) every batch, then take each sample's timestep at an index drawn by torch.randint(0, 999)
  (min_denoising_steps 0, max_denoising_steps 999); σ = timestep / 1000 (add_noise).
- toolkit/samplers/custom_flowmatch_sampler.py set_train_timesteps: linear and weighted: linspace(1000, 1);
  sigmoid: (1 - sigmoid(randn(1000))) · 1000, sorted; shift / flux_shift: linspace(σ_max, σ_min) · 1000 of the
  scheduler, shifted as diffusers shifts (dynamic for Flux: μ = calculate_shift(h·w / 2², 256, 4096, 0.5, 1.15),
  σ' = e^μ / (e^μ + 1/σ - 1); static for SD3: σ' = 3σ / (1 + 2σ)); lognorm_blend: 750 draws x of LogNormal(0,
  0.333) as (1 - x / max x) · 1000 plus linspace(1000, 1, 250), cut to integers.
- toolkit/sampler.py: Flux (dev and schnell) trains with flux_config (use_dynamic_shifting, max_shift 1.15),
  SD3 with sd_flow_config (shift 3.0, no dynamic shifting); DDPM models (SDXL) never read timestep_type.
"""
import math

import pytest
import torch
import yaml

from eridiffusion.trainers.arch import Batch, detect
from eridiffusion.trainers.data import Bucket, DatasetItem
from eridiffusion.trainers.job import parse_job

QUARTILES = torch.tensor([0.25, 0.5, 0.75])
DRAWS = 20_000
# 20,000 draws put a quartile within about ±0.005 of the distribution's; the old mapping (sigmoid or linear then
# the model's shift) was 0.25 off at the median
TOLERANCE = 0.012


# -------------------------------------------------------------------------- ai-toolkit's draw, from its source
def aitk_grid(timestep_type: str, arch: str, generator: torch.Generator) -> torch.Tensor:
    """σ of the 1000 training timesteps set_train_timesteps makes for one batch at 1024² (128² latent)."""
    if timestep_type in ("linear", "weighted"):
        return torch.linspace(1000, 1, 1000, dtype=torch.float64) / 1000
    if timestep_type == "sigmoid":
        t = torch.sigmoid(torch.randn(1000, generator=generator, dtype=torch.float64))
        return ((1 - t) * 1000).sort(descending=True).values / 1000
    if timestep_type in ("shift", "flux_shift"):
        if arch.startswith("flux"):       # dynamic: σ_max 1, σ_min 1/1000 (diffusers' __init__ shifts nothing)
            sigmas = torch.linspace(1000, 1, 1000, dtype=torch.float64) / 1000
            m = (1.15 - 0.5) / (4096 - 256)
            mu = (128 * 128 // 2 ** 2) * m + (0.5 - m * 256)
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        static = lambda s: 3.0 * s / (1 + 2.0 * s)  # noqa: E731 -- __init__ already shifted σ_min and σ_max
        sigmas = torch.linspace(static(1.0) * 1000, static(1 / 1000) * 1000, 1000, dtype=torch.float64) / 1000
        return static(sigmas)
    if timestep_type == "lognorm_blend":
        x = torch.exp(0.333 * torch.randn(750, generator=generator, dtype=torch.float64))
        grid = torch.cat([(1 - x / x.max()) * 1000, torch.linspace(1000, 1, 250, dtype=torch.float64)])
        return grid.sort(descending=True).values.to(torch.int32).double() / 1000
    raise AssertionError(timestep_type)


def aitk_quartiles(timestep_type: str, arch: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    batches = 1 if timestep_type in ("linear", "weighted", "shift", "flux_shift") else 200   # fixed grids
    drawn = [aitk_grid(timestep_type, arch, generator)[torch.randint(0, 999, (DRAWS // batches,),
                                                                     generator=generator)]
             for _ in range(batches)]
    return torch.quantile(torch.cat(drawn), QUARTILES.double()).float()


# ----------------------------------------------------------------------------------------------- our draw
def example_job(arch: str, timestep_type: str | None) -> str:
    """The train and model sections of ai-toolkit's train_lora_flux_24gb / _flux_schnell_24gb /
    _sd35_large_24gb examples, with timestep_type as given (None: left out, as the Flux examples do)."""
    train = {"batch_size": 1, "steps": 2000, "gradient_accumulation_steps": 1, "train_unet": True,
             "train_text_encoder": False, "gradient_checkpointing": True, "noise_scheduler": "flowmatch",
             "optimizer": "adamw8bit", "lr": 1e-4, "dtype": "bf16"}
    if timestep_type is not None:
        train["timestep_type"] = timestep_type
    model = {"sd3": {"name_or_path": "stabilityai/stable-diffusion-3.5-large", "is_v3": True},
             "flux": {"name_or_path": "black-forest-labs/FLUX.1-dev", "is_flux": True},
             "flux_schnell": {"name_or_path": "black-forest-labs/FLUX.1-schnell", "is_flux": True},
             "sdxl": {"name_or_path": "stabilityai/stable-diffusion-xl-base-1.0", "arch": "sdxl"}}[arch]
    if arch == "sdxl":
        train["noise_scheduler"] = "ddpm"
    return yaml.safe_dump({"job": "extension", "config": {"name": "example", "process": [{
        "type": "sd_trainer", "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
        "datasets": [{"folder_path": "images", "resolution": [1024]}], "train": train, "model": model}]}})


def our_sigmas(tiny, arch: str, timestep_type: str | None, batch_size: int = 50) -> torch.Tensor:
    model = tiny.tiny_model(arch)
    settings = parse_job(example_job(arch, timestep_type), "example.yaml").settings
    items = [DatasetItem(f"{i}.png", "a", 1, False, (1024, 1024), Bucket(1024, 1024), (0, 0), f"h{i}")
             for i in range(batch_size)]
    generator = torch.Generator().manual_seed(0)
    batch = Batch(torch.zeros(batch_size, 1, 1, 1), [], items)   # sample_sigmas reads the items only
    return torch.cat([detect(model).sample_sigmas(model.model.model_sampling, batch, generator, settings)
                      for _ in range(DRAWS // batch_size)])


@pytest.mark.parametrize("arch, timestep_type, aitk_type", [
    ("flux", None, "sigmoid"),                 # train_lora_flux_24gb.yaml as it is
    ("flux_schnell", None, "sigmoid"),         # train_lora_flux_schnell_24gb.yaml as it is
    ("sd3", "linear", "linear"),               # train_lora_sd35_large_24gb.yaml as it is
    *[(arch, kind, kind) for arch in ("flux", "flux_schnell", "sd3")
      for kind in ("sigmoid", "linear", "weighted", "shift", "flux_shift", "lognorm_blend")],
])
def test_sigma_quartiles_match_ai_toolkits_for_each_timestep_type_and_model(tiny, arch, timestep_type, aitk_type):
    ours = torch.quantile(our_sigmas(tiny, arch, timestep_type), QUARTILES)
    theirs = aitk_quartiles(aitk_type, arch)
    assert torch.allclose(ours, theirs, atol=TOLERANCE), (ours.tolist(), theirs.tolist())


def test_the_flux_example_trains_around_sigma_one_half_not_at_the_shifted_three_quarters(tiny):
    # the numbers: the shifted draw had its median at 0.759 (Flux-dev at 1024²) where ai-toolkit's is 0.5
    assert abs(our_sigmas(tiny, "flux", None).median().item() - 0.5) < TOLERANCE
    shifted = torch.quantile(our_sigmas(tiny, "flux", "shift"), 0.5).item()
    assert abs(shifted - 0.5 * math.exp(1.15) / (1 + 0.5 * (math.exp(1.15) - 1))) < TOLERANCE


def test_sdxl_draws_its_ddpm_timesteps_uniformly_whatever_timestep_type_says(tiny):
    model = tiny.tiny_model("sdxl")
    for timestep_type in (None, "sigmoid", "weighted", "shift", "lognorm_blend"):
        timesteps = model.model.model_sampling.timestep(our_sigmas(tiny, "sdxl", timestep_type)).float()
        quartiles = torch.quantile(timesteps, QUARTILES)
        assert torch.allclose(quartiles, torch.tensor([250.0, 500.0, 750.0]), atol=15), (timestep_type, quartiles)


def test_weighted_weighs_the_loss_by_ai_toolkits_table_of_timesteps(tiny):
    model = tiny.tiny_model("flux")
    settings = parse_job(example_job("flux", "weighted"), "example.yaml").settings
    assert settings.loss_weighting == "weighted"
    # default_weighing_scheme.py: entry i weighs timestep 1000 - i; [0], [124] (its largest) and [998]
    sigma = torch.tensor([1.0, 0.876, 0.002])
    weight = detect(model).loss_weight(model.model.model_sampling, sigma, settings)
    torch.testing.assert_close(weight, torch.tensor([0.905706524848938, 1.5226575136184692, 0.4453802704811096]))
    unweighted = parse_job(example_job("flux", "linear"), "example.yaml").settings
    assert torch.equal(detect(model).loss_weight(model.model.model_sampling, sigma, unweighted), torch.ones(3))


def test_our_own_timestep_values_and_an_explicit_shift_keep_the_canvas_meaning(tiny):
    def settings(**train):
        text = yaml.safe_load(example_job("sd3", None))
        text["config"]["process"][0]["train"].update(train)
        return parse_job(yaml.safe_dump(text), "x.yaml").settings
    canvas = settings(timestep_type="logit_normal")
    assert (canvas.timestep_sampling, canvas.timestep_shift, canvas.resolution_shift) == ("logit_normal", 0.0, False)
    explicit = settings(timestep_type="sigmoid", timestep_shift=2.0)
    assert (explicit.timestep_sampling, explicit.timestep_shift) == ("sigmoid", 2.0)
