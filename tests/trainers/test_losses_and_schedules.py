"""Loss types and learning-rate schedules do what their formulas say: kohya's pseudo-Huber with its threshold
schedules, and transformers' schedules after our warm-up."""
import math

import pytest
import torch

from eridiffusion.trainers.arch import detect
from eridiffusion.trainers.config import LOSS_TYPES, OPTIMIZERS, SCHEDULES, ConfigError, TrainingSettings, help_of
from eridiffusion.trainers.losses import elementwise_loss, huber_threshold
from eridiffusion.trainers.optim import learning_rate

PREDICTION = torch.tensor([[0.0, 1.0, -2.0, 0.5]])
TARGET = torch.tensor([[0.0, 0.0, 1.0, 0.5 + 1e-3]])


def test_mse_and_l1_are_the_squared_and_absolute_error():
    difference = [0.0, 1.0, -3.0, -1e-3]
    mse = elementwise_loss(PREDICTION, TARGET, TrainingSettings(loss_type="mse"))
    l1 = elementwise_loss(PREDICTION, TARGET, TrainingSettings(loss_type="l1"))
    torch.testing.assert_close(mse, torch.tensor([[d * d for d in difference]]))
    torch.testing.assert_close(l1, torch.tensor([[abs(d) for d in difference]]))


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_huber_and_smooth_l1_are_kohyas_pseudo_huber_quadratic_near_zero_and_linear_far_away(loss_type):
    c = torch.tensor([0.1])
    loss = elementwise_loss(PREDICTION, TARGET, TrainingSettings(loss_type=loss_type), threshold=c)
    scale = 0.1 if loss_type == "huber" else 1.0      # kohya: huber = 2c(√(d²+c²)-c), smooth_l1 = 2(√(d²+c²)-c)
    expected = [scale * 2 * (math.sqrt(d * d + 0.01) - 0.1) for d in (0.0, 1.0, -3.0, -1e-3)]
    torch.testing.assert_close(loss, torch.tensor([expected]))
    # near 0 it is the squared error (times 1/c for smooth_l1); far from it about linear: from |d| = 1 to 3 it
    # grows 3.2 times where the squared error grows 9 times
    assert loss[0, 3].item() == pytest.approx(scale * 1e-6 / 0.1, rel=1e-2)
    assert 3.0 < loss[0, 2].item() / loss[0, 1].item() < 3.3


def test_huber_threshold_schedules_are_kohyas():
    share, ratio = torch.tensor([0.0, 0.5, 0.999]), torch.tensor([0.03, 1.0, 14.6])
    s = dict(loss_type="huber", huber_c=0.1, huber_scale=2.0)
    exponential = huber_threshold(TrainingSettings(huber_schedule="exponential", **s), share, ratio)
    # kohya: exp(-α t) · huber_scale with α = -ln(huber_c) / 1000, t = share · 1000
    torch.testing.assert_close(exponential, torch.exp(math.log(0.1) * share) * 2.0)
    assert exponential[0].item() == pytest.approx(2.0) and exponential[2].item() == pytest.approx(0.2, rel=0.01)
    snr = huber_threshold(TrainingSettings(huber_schedule="snr", **s), share, ratio)
    torch.testing.assert_close(snr, (1 - 0.1) / (1 + ratio) ** 2 + 0.1)      # kohya's, without huber_scale
    constant = huber_threshold(TrainingSettings(huber_schedule="constant", **s), share, ratio)
    torch.testing.assert_close(constant, torch.full((3,), 0.2))


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_noise_levels_run_from_clean_to_pure_noise_for_the_huber_schedules(tiny, arch):
    model = tiny.tiny_model(arch)
    ms = model.model.model_sampling
    sigma = ms.sigmas[[0, len(ms.sigmas) // 2, -1]] if arch == "sdxl" else torch.tensor([0.001, 0.5, 0.999])
    share, ratio = detect(model).noise_levels(ms, sigma)
    assert 0 <= share[0] < 0.01 and 0.45 < share[1] < 0.55 and share[2] > 0.99
    assert ratio[0] < 0.05 and ratio[2] > 10 and torch.all(ratio[1:] > ratio[:-1])
    if arch == "sdxl":     # √((1-ᾱ)/ᾱ) of SDXL's DDPM schedule (scaled_linear), what kohya's snr schedule reads
        alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
        alphas = alphas[[0, len(ms.sigmas) // 2, -1]]
        torch.testing.assert_close(ratio, ((1 - alphas) / alphas).sqrt().float())


def _lrs(steps=12, **settings):
    s = TrainingSettings(learning_rate=1.0, **settings)
    return [learning_rate(s, step, steps) for step in range(steps)]


def test_warm_up_rises_linearly_and_every_schedule_starts_at_the_peak_after_it():
    for schedule in SCHEDULES:
        lrs = _lrs(warmup_steps=4, schedule=schedule)
        assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0, schedule


def test_constant_linear_cosine_and_polynomial_follow_their_formulas_and_end_at_zero():
    progress = [s / 10 for s in range(10)]
    assert _lrs(10, schedule="constant") == _lrs(10, schedule="constant_with_warmup") == [1.0] * 10
    assert _lrs(10, schedule="linear") == pytest.approx([1 - p for p in progress])
    assert _lrs(10, schedule="cosine") == pytest.approx([0.5 * (1 + math.cos(math.pi * p)) for p in progress])
    assert _lrs(10, schedule="polynomial", schedule_power=2.0) == pytest.approx([(1 - p) ** 2 for p in progress])
    s = TrainingSettings(learning_rate=1.0, schedule="cosine")
    assert learning_rate(s, 10, 10) == 0.0 and learning_rate(s, 25, 10) == 0.0, "past the end it stays at its end"


def test_cosine_with_restarts_returns_to_the_peak_at_the_start_of_each_cycle():
    lrs = _lrs(12, schedule="cosine_with_restarts", schedule_cycles=3)
    assert lrs[0] == lrs[4] == lrs[8] == 1.0
    assert lrs[1:4] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)])
    assert lrs[5:8] == pytest.approx(lrs[1:4]) and lrs[9:12] == pytest.approx(lrs[1:4])


def test_step_multiplies_by_gamma_every_step_size_steps_after_warm_up():
    lrs = _lrs(10, schedule="step", schedule_step_size=3, schedule_gamma=0.5, warmup_steps=1)
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    # step_size 0: four equal steps over the schedule
    assert _lrs(8, schedule="step", schedule_gamma=0.1) == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])


@pytest.mark.parametrize("field, value, words", [
    ("loss_type", "wavelet", "loss_type must be one of mse, l1, huber, smooth_l1"),
    ("huber_schedule", "linear", "huber_schedule must be one of snr, exponential, constant"),
    ("huber_c", 0.0, "huber_c must be above 0"), ("huber_c", 1.5, "huber_c must be above 0"),
    ("schedule_cycles", 0, "schedule_cycles must be at least 1"), ("schedule_gamma", 2.0, "schedule_gamma"),
    ("schedule_power", 0.0, "schedule_power must be positive"), ("schedule", "cosine_annealing", "cosine_with_restarts"),
])
def test_a_wrong_loss_or_schedule_setting_is_an_error_naming_it(field, value, words):
    with pytest.raises(ConfigError, match=words):
        TrainingSettings(**{field: value})


@pytest.mark.parametrize("field, names", [("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss_type", LOSS_TYPES)])
def test_the_tooltip_of_each_choice_names_every_option(field, names):
    assert all(name in help_of(TrainingSettings, field) for name in names)
