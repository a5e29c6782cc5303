"""SDXL LoRA end to end, in-process: caches, training, chaining, resume, files the stock loader reads."""
import logging
import math

import pytest
import torch

import comfy.sd
from eridiffusion.trainers.config import OPTIMIZERS, SCHEDULES
from helpers import fixed_loss, model_output, prepared, run, settings, train


@pytest.fixture
def p(comfy_folders, tiny):
    return prepared(comfy_folders, tiny)


def test_second_cache_run_with_the_same_inputs_performs_zero_vae_and_text_encodes(comfy_folders, tiny, monkeypatch):
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents
    p = prepared(comfy_folders, tiny)
    assert p["latents"].encoded == 4 and p["captions"].encoded == 5   # 4 captions + the empty one
    calls = {"vae": 0, "clip": 0}
    vae_encode, clip_encode = comfy.sd.VAE.encode, comfy.sd.CLIP.encode_from_tokens
    monkeypatch.setattr(comfy.sd.VAE, "encode", lambda self, *a, **k: calls.__setitem__("vae", calls["vae"] + 1)
                        or vae_encode(self, *a, **k))
    monkeypatch.setattr(comfy.sd.CLIP, "encode_from_tokens", lambda self, *a, **k: calls.__setitem__(
        "clip", calls["clip"] + 1) or clip_encode(self, *a, **k))
    latents = run(EriCacheLatents, dataset=p["dataset"], vae=p["vae"], batch_size=4)[0]
    captions = run(EriCacheCaptions, dataset=p["dataset"], clip=p["clip"])[0]
    assert calls == {"vae": 0, "clip": 0} and latents.encoded == 0 and captions.encoded == 0
    assert all(torch.equal(a, b) for a, b in zip(latents.latents, p["latents"].latents))
    # another VAE (different weights) must not reuse the cache
    other = tiny.tiny_vae("sdxl", seed=5)
    assert run(EriCacheLatents, dataset=p["dataset"], vae=other, batch_size=4)[0].encoded == 4


def test_captions_keep_sdxl_pooled_output_and_an_empty_caption_for_dropout(p):
    text = p["captions"]
    assert "" in dict(text.embeddings)
    for caption in p["dataset"].captions:
        emb = text.get(caption)
        assert emb.context.shape == (77, 64) and emb.pooled.shape == (32,)


def test_training_lowers_the_loss_on_four_images_in_50_steps(p):
    before = fixed_loss(p["model"], p)
    model, adapter, history = train(p, 50, learning_rate=1e-2)
    after = fixed_loss(model, p)
    assert adapter.step == 50 and len(history.losses) == 50
    assert after < 0.9 * before, (before, after)


def test_base_model_outputs_stay_bit_identical_through_training_and_sampling(p):
    before = model_output(p["model"], p)
    trained_model, _, _ = train(p, 5)
    with_adapter = model_output(trained_model, p)
    after = model_output(p["model"], p)
    assert torch.equal(before, after)
    assert not torch.allclose(before, with_adapter)


def test_inputs_are_never_mutated(p):
    weights = {k: v.clone() for k, v in p["adapter"].weights.items()}
    latents = [t.clone() for t in p["latents"].latents]
    train(p, 3)
    assert p["adapter"].step == 0 and p["adapter"].optimizer is None
    assert all(torch.equal(weights[k], v) for k, v in p["adapter"].weights.items())
    assert all(torch.equal(a, b) for a, b in zip(latents, p["latents"].latents))


def test_chaining_two_10_step_nodes_equals_one_20_step_node_bit_exactly(p):
    _, once, _ = train(p, 20, batch_size=2, noise_offset=0.05, caption_dropout=0.3, min_snr_gamma=5.0,
                       gradient_checkpointing=True)
    _, half, _ = train(p, 10, batch_size=2, noise_offset=0.05, caption_dropout=0.3, min_snr_gamma=5.0,
                       gradient_checkpointing=True)
    _, twice, history = train(p, 10, adapter=half, batch_size=2, noise_offset=0.05, caption_dropout=0.3,
                              min_snr_gamma=5.0, gradient_checkpointing=True)
    assert twice.step == 20 and history.losses == once.history.losses
    assert all(torch.equal(once.weights[k], twice.weights[k]) for k in once.weights)


def test_gradient_checkpointing_gives_the_same_training_as_without(p):
    _, plain, _ = train(p, 3)
    _, checkpointed, _ = train(p, 3, gradient_checkpointing=True)
    for k in plain.weights:
        torch.testing.assert_close(plain.weights[k], checkpointed.weights[k], rtol=1e-5, atol=1e-6)


def test_saved_file_loads_in_stock_lora_loader_with_the_same_output_and_no_unloaded_keys(p, comfy_folders, caplog):
    from nodes import LoraLoaderModelOnly
    from eridiffusion.nodes.adapter import EriSaveAdapter
    trained_model, adapter, _ = train(p, 5)
    name = run(EriSaveAdapter, adapter=adapter, filename_prefix="eri/test", save_dtype="fp32")[0]
    assert name == "eri/test_000005.safetensors"
    assert (comfy_folders["loras"] / "eri" / "test_000005.safetensors").is_file()
    assert (comfy_folders["loras"] / "eri" / "test_000005.eri-state").is_file()
    import folder_paths
    assert folder_paths.get_filename_list("loras") == [name], "the state file must not show up as a LoRA"
    with caplog.at_level(logging.WARNING):
        (loaded,) = LoraLoaderModelOnly().load_lora_model_only(p["model"], name, 1.0)
    assert "lora key not loaded" not in caplog.text
    expected = model_output(trained_model, p)
    got = model_output(loaded, p)
    base = model_output(p["model"], p)
    assert not torch.allclose(expected, base)
    assert (got - expected).norm() / expected.norm() <= 1e-3


def test_kohya_keys_and_metadata(p, comfy_folders):
    import comfy.lora
    from safetensors import safe_open
    from eridiffusion.nodes.adapter import EriSaveAdapter
    _, adapter, _ = train(p, 2)
    name = run(EriSaveAdapter, adapter=adapter, filename_prefix="keys", save_dtype="fp16")[0]
    key_map = comfy.lora.model_lora_keys_unet(p["model"].model, {})
    with safe_open(str(comfy_folders["loras"] / name), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert f.get_tensor(keys[0]).dtype in (torch.float16, torch.float32)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(stems) == len(adapter.spec.targets)
    assert all(stem.startswith("lora_unet_") and stem in key_map for stem in stems)
    assert meta["eri.architecture"] == "sdxl" and meta["eri.adapter"] == "lora"
    assert meta["eri.rank"] == "4" and float(meta["eri.alpha"]) == 4.0 and meta["eri.steps"] == "2"
    assert '"learning_rate": 0.001' in meta["eri.settings"]


# Learning rates and steps at which each optimizer clearly lowers the loss of the tiny model (Prodigy starts
# from a tiny step size and grows it; Lion's sign updates want a smaller learning rate).
LEARNS_WITH = {"adamw": (1e-2, 10), "adamw8bit": (1e-2, 10), "adafactor": (1e-2, 10), "prodigy": (1.0, 30),
               "lion": (3e-3, 10), "lion8bit": (3e-3, 10), "adamw_schedulefree": (1e-2, 10), "came": (3e-2, 10)}
NEEDS_BITSANDBYTES = ("adamw8bit", "lion", "lion8bit")


@pytest.fixture
def big(p):
    """Rank 16 on all linear layers: some LoRA matrices reach bitsandbytes' 4096-element minimum for 8-bit state."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    return run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=16, alpha=16.0, target="all_linear",
               seed=0, dtype="fp32")[0]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(p, big, optimizer):
    if optimizer in NEEDS_BITSANDBYTES:
        pytest.importorskip("bitsandbytes")
    lr, steps = LEARNS_WITH[optimizer]
    before = fixed_loss(p["model"], p)
    model, adapter, _ = train(p, steps, adapter=big, optimizer=optimizer, learning_rate=lr)
    after = fixed_loss(model, p)
    assert adapter.optimizer_name == optimizer and after < before - 0.04, (before, after)


def test_adafactor_lowers_the_loss_about_as_much_as_adamw_on_the_same_task(p, big):
    # torch's Adafactor (relative step size) kept zero-initialised lora_up at zero: 1.312 -> 1.3115 where AdamW
    # reached 1.12
    before = fixed_loss(p["model"], p)
    drops = {}
    for optimizer in ("adamw", "adafactor"):
        model, _, _ = train(p, 30, adapter=big, optimizer=optimizer, learning_rate=1e-2)
        drops[optimizer] = before - fixed_loss(model, p)
    assert drops["adafactor"] > 0.8 * drops["adamw"] and drops["adamw"] > 0.15, drops


def test_an_adafactor_state_of_torchs_adafactor_continues_with_a_new_optimizer_state_and_a_warning(p, caplog):
    # before transformers' Adafactor, `adafactor` was torch's, whose state (row_var, col_var) cannot continue it
    _, trained, _ = train(p, 1, optimizer="adafactor")
    with torch.inference_mode(False):
        params = [torch.nn.Parameter(w.clone()) for w in trained.weights.values()]
        old = torch.optim.Adafactor(params, lr=1e-3)
        for param in params:
            param.grad = torch.ones_like(param)
        old.step()
    with caplog.at_level(logging.WARNING):
        _, continued, history = train(p, 1, adapter=trained.replace(optimizer=old.state_dict()), optimizer="adafactor")
    assert "saved by torch's Adafactor" in caplog.text and math.isfinite(history.losses[-1])
    assert "exp_avg_sq_row" in str(continued.optimizer["state"]) and "row_var" not in str(continued.optimizer["state"])


@pytest.mark.parametrize("optimizer, schedule", [(o, "cosine") for o in OPTIMIZERS]
                         + [("adamw", s) for s in SCHEDULES if s != "cosine"])
def test_load_adapter_resumes_bit_exactly(p, comfy_folders, big, optimizer, schedule):
    from eridiffusion.nodes.adapter import EriLoadAdapter, EriSaveAdapter
    if optimizer in NEEDS_BITSANDBYTES:
        pytest.importorskip("bitsandbytes")
    kw = dict(optimizer=optimizer, learning_rate=LEARNS_WITH[optimizer][0], schedule=schedule, warmup_steps=2,
              total_steps=8, schedule_cycles=2, schedule_step_size=2, schedule_power=2.0)
    _, straight, _ = train(p, 8, adapter=big, **kw)
    _, first, _ = train(p, 4, adapter=big, **kw)
    name = run(EriSaveAdapter, adapter=first, filename_prefix="resume", save_dtype="fp16")[0]
    resumed = run(EriLoadAdapter, lora_name=name)[0]
    assert resumed.step == 4 and resumed.optimizer_name == optimizer and resumed.optimizer is not None
    _, second, _ = train(p, 4, adapter=resumed, **kw)
    assert second.history.losses == straight.history.losses
    assert second.history.learning_rates == straight.history.learning_rates
    assert all(torch.equal(straight.weights[k], second.weights[k]) for k in straight.weights)
    if optimizer == "lion8bit":   # its state is quantised (what makes it 8-bit), and that is what resumed
        assert any(t.dtype == torch.uint8 for s in first.optimizer["state"].values()
                   for t in s.get("__bnb_optimizer_quant_state__", {}).values() if isinstance(t, torch.Tensor))


def test_schedule_free_adamw_saves_and_samples_its_averaged_weights_not_the_gradient_point(p):
    # Schedule-free AdamW takes gradients at y = (1-β1)·z + β1·x and evaluates with x, the running average of
    # its iterates z: x1 = z1 after the first step, x2 = (z1 + z2) / 2 after the second (constant lr).
    kw = dict(optimizer="adamw_schedulefree", learning_rate=1e-2)
    _, one, _ = train(p, 1, **kw)
    _, two, _ = train(p, 1, adapter=one, **kw)
    assert two.optimizer["param_groups"][0]["train_mode"] is False
    index = {name: i for i, name in enumerate(two.weights)}
    for name, x2 in two.weights.items():
        z1, z2 = one.optimizer["state"][index[name]]["z"], two.optimizer["state"][index[name]]["z"]
        torch.testing.assert_close(one.weights[name], z1, rtol=0, atol=0)
        torch.testing.assert_close(x2, (z1 + z2) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["l1", "huber", "smooth_l1"])
def test_each_loss_type_is_what_training_lowers(p, loss_type):
    from eridiffusion.trainers.config import TrainingSettings
    measured = TrainingSettings(loss_type=loss_type, huber_schedule="snr", huber_c=0.1)
    before = fixed_loss(p["model"], p, settings=measured)
    model, _, history = train(p, 20, learning_rate=1e-2, loss_type=loss_type, huber_schedule="snr", huber_c=0.1)
    after = fixed_loss(model, p, settings=measured)
    assert after < 0.95 * before, (before, after)
    # The first step's reported loss is this type's of the same prediction MSE training sees first: per sample,
    # mean |d| <= √(mean d²) (Jensen), 2c(√(d²+c²)-c) < d² (c <= 1), 2(√(d²+c²)-c) <= 2|d|.
    mse = train(p, 1, learning_rate=1e-2)[2].losses[0]
    bound = {"l1": math.sqrt(mse), "huber": mse, "smooth_l1": 2 * math.sqrt(mse)}[loss_type]
    assert 0 < history.losses[0] < bound and history.losses[0] != mse


def test_adamw_8bit_trains_on_the_cpu_and_its_state_resumes(p, comfy_folders):
    pytest.importorskip("bitsandbytes")
    from eridiffusion.nodes.adapter import EriCreateAdapter, EriLoadAdapter, EriSaveAdapter
    # rank 16 on all linear layers: some LoRA matrices reach bitsandbytes' 4096-element minimum for 8-bit state
    big = run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=16, alpha=16.0, target="all_linear",
              seed=0, dtype="fp32")[0]
    _, straight, _ = train(p, 4, adapter=big, optimizer="adamw8bit")
    _, first, _ = train(p, 2, adapter=big, optimizer="adamw8bit")
    quantised = [t for s in first.optimizer["state"].values()
                 for t in s.get("__bnb_optimizer_quant_state__", {}).values() if isinstance(t, torch.Tensor)]
    assert any(t.dtype == torch.uint8 for t in quantised)
    name = run(EriSaveAdapter, adapter=first, filename_prefix="bnb", save_dtype="fp32")[0]
    _, second, _ = train(p, 2, adapter=run(EriLoadAdapter, lora_name=name)[0], optimizer="adamw8bit")
    assert all(torch.isfinite(torch.tensor(second.history.losses)))
    for k in straight.weights:
        torch.testing.assert_close(straight.weights[k], second.weights[k], rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_without_nan(p, precision):
    _, adapter, history = train(p, 3, precision=precision)
    assert all(v == v for v in history.losses)
    assert any(not torch.equal(adapter.weights[k], p["adapter"].weights[k]) for k in adapter.weights)


def test_loss_graph_draws_the_history(p):
    from eridiffusion.nodes.train import EriLossGraph
    _, _, history = train(p, 6)
    (image,) = run(EriLossGraph, loss=history, smoothing=0.9)
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 100
    assert image.std() > 0.05      # axes, labels and curves drawn, not a blank canvas


def test_adapter_for_another_architecture_is_refused(p, tiny):
    with torch.inference_mode(False):
        flux = tiny.tiny_model("flux")
    with pytest.raises(ValueError, match="the adapter was made for sdxl but the MODEL is flux: create the adapter"):
        train({**p, "model": flux}, 1)


def test_rank_larger_than_a_layer_is_a_clear_error(p):
    from eridiffusion.nodes.adapter import EriCreateAdapter
    with pytest.raises(ValueError, match=r"rank 4096 is larger than layer .* choose rank <="):
        run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=4096, alpha=1.0, target="attention",
            seed=0, dtype="fp32")


def test_adamw_8bit_without_bitsandbytes_is_a_clear_error(p, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import fails as if not installed
    with pytest.raises(ValueError, match="adamw8bit needs bitsandbytes.*choose optimizer adamw"):
        train(p, 1, optimizer="adamw8bit")


def test_dataset_folder_outside_comfyuis_input_folder_is_refused(comfy_folders, monkeypatch):
    from eridiffusion.nodes.dataset import EriTrainingImages
    from conftest import write_images
    write_images(comfy_folders["output"] / "elsewhere", [(64, 64)])
    (comfy_folders["input"] / "link").symlink_to(comfy_folders["output"] / "elsewhere")
    kw = dict(resolution=64, trigger_word="", default_caption="", flip=False, min_side=64, max_side=128,
              max_upscale=1.0)
    for folder in ("../output/elsewhere", str(comfy_folders["output"] / "elsewhere"), "link"):
        with pytest.raises(ValueError, match="points outside .*ERI_ALLOW_ANY_PATH=1"):
            run(EriTrainingImages, folder=folder, **kw)
    monkeypatch.setenv("ERI_ALLOW_ANY_PATH", "1")
    dataset = run(EriTrainingImages, folder=str(comfy_folders["output"] / "elsewhere"), **kw)[0]
    assert len(dataset.items) == 1


def test_save_prefix_outside_the_loras_folder_is_refused(p):
    from eridiffusion.nodes.adapter import EriSaveAdapter
    with pytest.raises(ValueError, match="filename_prefix .* points outside"):
        run(EriSaveAdapter, adapter=p["adapter"], filename_prefix="../../evil", save_dtype="fp16")


# ------------------------------------------------------------------------------------------------------ EMA
def test_ema_weights_are_decay_times_ema_plus_the_rest_times_the_weights_after_every_nth_step(p):
    decay, every = 0.8, 2
    adapter, raw = p["adapter"], [p["adapter"].weights]
    for _ in range(5):      # one step at a time: chained Train steps equal one run
        _, adapter, _ = train(p, 1, adapter=adapter, ema=True, ema_decay=decay, ema_every=every)
        raw.append(adapter.weights)
    expected = {k: v.double() for k, v in raw[0].items()}
    for step in range(1, 6):
        if step % every == 0:
            expected = {k: decay * expected[k] + (1 - decay) * raw[step][k].double() for k in expected}
    for k in expected:
        torch.testing.assert_close(adapter.ema[k].double(), expected[k], rtol=1e-6, atol=1e-9)
    assert not all(torch.equal(adapter.ema[k], adapter.weights[k]) for k in expected)
    _, off, _ = train(p, 1, adapter=adapter)
    assert off.ema is None, "a Train steps with ema off drops the EMA"


def test_with_ema_the_saved_adapter_is_the_ema_and_resuming_its_state_continues_bit_exactly(p, comfy_folders):
    from safetensors.torch import load_file
    from eridiffusion.nodes.adapter import EriLoadAdapter, EriSaveAdapter
    from eridiffusion.trainers import adapters
    from eridiffusion.trainers.state import patched_model
    ema = dict(ema=True, ema_decay=0.9, caption_dropout=0.3, batch_size=2)
    straight_model, straight, _ = train(p, 8, **ema)
    _, first, _ = train(p, 4, **ema)
    name = run(EriSaveAdapter, adapter=first, filename_prefix="ema", save_dtype="fp32")[0]
    saved = load_file(str(comfy_folders["loras"] / name))
    expected = adapters.method("lora").to_file_tensors(first.spec, first.ema, torch.float32)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    resumed = run(EriLoadAdapter, lora_name=name)[0]
    assert all(torch.equal(resumed.weights[k], first.weights[k]) and torch.equal(resumed.ema[k], first.ema[k])
               for k in first.weights)
    _, second, _ = train(p, 4, adapter=resumed, **ema)
    assert second.history.losses == straight.history.losses
    assert all(torch.equal(straight.weights[k], second.weights[k]) and torch.equal(straight.ema[k], second.ema[k])
               for k in straight.weights)
    # Train steps' MODEL applies the EMA, not the raw weights
    raw_model = patched_model(p["model"], straight.replace(ema=None))
    assert not torch.allclose(model_output(straight_model, p), model_output(raw_model, p))


# ------------------------------------------------------------------------------------------ caption variants
@pytest.fixture
def shuffled(p, comfy_folders):
    """The four images with four-tag captions, shuffled with the first tag kept, three variants each."""
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents, EriTrainingImages
    for i in range(4):
        (comfy_folders["input"] / "set" / f"img{i}.txt").write_text(f"pattern {i}, red, round, small")
    dataset = run(EriTrainingImages, folder="set", resolution=64, trigger_word="", default_caption="", flip=False,
                  min_side=64, max_side=128, max_upscale=1.0, shuffle_captions=True, keep_tokens=1,
                  caption_variants=3)[0]
    return dict(p, dataset=dataset, captions=run(EriCacheCaptions, dataset=dataset, clip=p["clip"])[0],
                latents=run(EriCacheLatents, dataset=dataset, vae=p["vae"], batch_size=4)[0])


def drawn_captions(monkeypatch):
    from eridiffusion.trainers.cache import TextSet
    seen, get = [], TextSet.get
    monkeypatch.setattr(TextSet, "get",
                        lambda self, caption, item=None: seen.append(caption) or get(self, caption, item))
    return seen


def test_shuffled_captions_cache_a_bounded_number_of_variants_and_each_step_draws_one_by_the_seed(
        shuffled, monkeypatch):
    assert shuffled["captions"].encoded == 4 * 3 + 1 - 1, "3 variants per image and the empty caption, " \
        "less the empty one cached by the first Cache captions"
    assert len(shuffled["captions"].embeddings) == 4 * 3 + 1
    seen = drawn_captions(monkeypatch)
    train(shuffled, 12, batch_size=4, caption_dropout=0.2)
    first = list(seen)
    seen.clear()
    train(shuffled, 12, batch_size=4, caption_dropout=0.2)
    assert seen == first, "the same seed draws the same variants"
    seen.clear()
    train(shuffled, 12, batch_size=4, caption_dropout=0.2, seed=1)
    assert seen != first
    variants = {c for i in shuffled["dataset"].items for c in i.caption_variants}
    assert variants <= set(first) | set(seen) and "" in first and all(c.startswith("pattern ") for c in variants)


def test_training_on_shuffled_captions_chains_and_resumes_bit_exactly(shuffled):
    _, once, _ = train(shuffled, 8, batch_size=2, caption_dropout=0.2)
    _, half, _ = train(shuffled, 4, batch_size=2, caption_dropout=0.2)
    _, twice, _ = train(shuffled, 4, adapter=half, batch_size=2, caption_dropout=0.2)
    assert twice.history.losses == once.history.losses
    assert all(torch.equal(once.weights[k], twice.weights[k]) for k in once.weights)
