"""Regularisation images (kohya's is_reg / prior_loss_weight, ai-toolkit's datasets[].is_reg / reg_weight) and
ai-toolkit's differential output preservation, trained on tiny models."""
import pytest
import torch

import comfy.model_management
import comfy.model_sampling
from conftest import write_images
from helpers import prepared, run, settings, train, with_reg


@pytest.fixture
def p(comfy_folders, tiny):
    # captions "ohwx, a photo of pattern i"; their class captions "person, a photo of pattern i"
    return prepared(comfy_folders, tiny, trigger_word="ohwx", preservation_class="person")


def same(a, b) -> bool:
    return a.history.losses == b.history.losses and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


# ------------------------------------------------------------------------------------- regularisation images
def test_reg_weight_0_trains_exactly_as_without_the_regularisation_images(p, comfy_folders):
    _, alone, _ = train(p, 4)
    both = with_reg(p, comfy_folders)
    assert sum(i.is_reg for i in both["dataset"].items) == 2 and len(both["dataset"].items) == 6
    _, zero, _ = train(both, 4, reg_weight=0.0)
    _, weighted, _ = train(both, 4, reg_weight=1.0)
    assert same(zero, alone)
    assert not same(weighted, alone)


def test_a_regularisation_batch_trains_beside_each_training_batch_its_loss_times_reg_weight(p, comfy_folders,
                                                                                          monkeypatch):
    from eridiffusion.trainers.loop import TrainingRun
    both = with_reg(p, comfy_folders)
    drawn = []
    original = TrainingRun._micro_batch

    def spy(self, reg=False):
        inputs = original(self, reg)
        indices = (self.reg_order if reg else self.order).batch(self.cursor - 1)
        items = [self.latents.dataset.items[i] for i in indices]
        drawn.append((reg, [i.is_reg for i in items], [i.path for i in items], inputs.get("reg_weight")))
        return inputs
    monkeypatch.setattr(TrainingRun, "_micro_batch", spy)
    train(both, 4, reg_weight=0.5, grad_accumulation=2)
    # 4 steps x 2 micro-batches, each a batch of training images and then one of regularisation images
    assert [reg for reg, *_ in drawn] == [False, True] * 8
    assert all(flags == [reg] for reg, flags, *_ in drawn)
    assert all((weight is None) if not reg else weight.tolist() == [0.5] for reg, _, _, weight in drawn)
    # the 2 regularisation images are repeated to match the 8 training batches (kohya), each as often
    reg_paths = [path for reg, _, paths, _ in drawn if reg for path in paths]
    assert sorted(reg_paths.count(path) for path in set(reg_paths)) == [4, 4]

    # the first step's loss: the training batch's plus reg_weight times the regularisation batch's
    monkeypatch.setattr(TrainingRun, "_micro_batch", original)
    first = {w: train(both, 1, reg_weight=w)[2].losses[0] for w in (0.0, 1.0, 3.0)}
    assert first[1.0] != first[0.0]
    assert first[3.0] - first[0.0] == pytest.approx(3 * (first[1.0] - first[0.0]), rel=1e-5)


def test_regularisation_images_alone_are_an_error_naming_the_fix(p, comfy_folders):
    from eridiffusion.nodes.dataset import EriCacheCaptions, EriCacheLatents, EriTrainingImages
    from eridiffusion.trainers.config import ConfigError
    write_images(comfy_folders["input"] / "reg", ((64, 64),) * 2, seed=1, prefix="reg")
    reg = run(EriTrainingImages, folder="reg", resolution=64, trigger_word="", default_caption="", flip=False,
              min_side=64, max_side=128, max_upscale=1.0, is_reg=True)[0]
    only = {**p, "latents": run(EriCacheLatents, dataset=reg, vae=p["vae"], batch_size=4)[0],
            "captions": run(EriCacheCaptions, dataset=reg, clip=p["clip"])[0]}
    with pytest.raises(ConfigError, match="only regularisation images .*Combine training images"):
        train(only, 1)


# --------------------------------------------------------------------------- differential output preservation
def _gap_on_class_captions(trained_model, p) -> float:
    """Mean squared difference between the MODEL with the trained adapter and the base MODEL, on every class
    caption at fixed noisy inputs."""
    def predict(patcher, text):
        base = patcher.model
        x = torch.randn(2, base.latent_format.latent_channels, 8, 8, generator=torch.Generator().manual_seed(5))
        flow = isinstance(base.model_sampling, comfy.model_sampling.CONST)
        cond = dict(c_crossattn=text.context.unsqueeze(0).repeat(2, 1, 1), guidance=torch.tensor([1.0]),
                    y=base.encode_adm(pooled_output=text.pooled.unsqueeze(0).repeat(2, 1), width=64, height=64))
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([patcher])
            return base.apply_model(x, torch.tensor([0.3, 0.8] if flow else [1.5, 7.0]), **cond).clone()
    classes = [c for c in p["dataset"].captions if c.startswith("person, ")]
    assert len(classes) == 4
    gaps = [(predict(trained_model, p["captions"].get(c)) - predict(p["model"], p["captions"].get(c))).square().mean()
            for c in classes]
    return float(sum(gaps) / len(gaps))


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux"])
def test_preservation_pulls_the_adapters_prediction_on_the_class_caption_toward_the_base_models(comfy_folders, tiny,
                                                                                             arch):
    p = prepared(comfy_folders, tiny, arch=arch, trigger_word="ohwx", preservation_class="person")
    plain_model, plain, plain_loss = train(p, 8, learning_rate=1e-2)
    kept_model, kept, kept_loss = train(p, 8, learning_rate=1e-2, diff_output_preservation=True,
                                        diff_output_preservation_multiplier=1.0)
    # a new LoRA changes nothing (its up weights are 0): the first step has no preservation loss nor gradient
    assert kept_loss.losses[0] == plain_loss.losses[0] and kept_loss.losses[1:] != plain_loss.losses[1:]
    plain_gap, kept_gap = _gap_on_class_captions(plain_model, p), _gap_on_class_captions(kept_model, p)
    assert plain_gap > 0 and kept_gap < 0.7 * plain_gap, (kept_gap, plain_gap)


def test_preservation_without_a_class_word_is_an_error_naming_the_input(comfy_folders, tiny):
    from eridiffusion.trainers.config import ConfigError
    p = prepared(comfy_folders, tiny, trigger_word="ohwx")
    with pytest.raises(ConfigError, match="set preservation_class \\(and trigger_word\\) on Training images"):
        train(p, 1, diff_output_preservation=True)


def test_a_class_word_without_a_trigger_word_is_refused_at_queue():
    from eridiffusion.nodes.dataset import EriTrainingImages
    verdict = EriTrainingImages.validate_inputs(folder=None, trigger_word="", preservation_class="person")
    assert "trigger_word is empty" in verdict
    assert EriTrainingImages.validate_inputs(folder=None, trigger_word="ohwx", preservation_class="person") is True


# ------------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("features", [{"reg"}, {"preservation"}, {"reg", "preservation"}])
def test_a_run_with_them_resumes_bit_exactly_from_its_saved_state(p, comfy_folders, features):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    from eridiffusion.nodes.train import EriTrainSteps
    data = with_reg(p, comfy_folders) if "reg" in features else p
    options = dict(reg_weight=0.5) if "reg" in features else {}
    if "preservation" in features:
        options.update(diff_output_preservation=True, diff_output_preservation_multiplier=2.0)

    def steps(n, adapter, **node_inputs):
        return run(EriTrainSteps, model=data["model"], adapter=adapter, latents=data["latents"],
                   captions=data["captions"], settings=settings(learning_rate=1e-2, **options), steps=n,
                   **node_inputs)[1]
    straight = steps(4, data["adapter"])
    steps(2, data["adapter"], save_every=2, keep_last=0, save_prefix="ckpt/half")
    resumed = steps(2, run(EriLoadAdapter, lora_name="ckpt/half_000002.safetensors")[0])
    assert resumed.step == 4 and same(resumed, straight)


def test_preservation_and_a_text_encoder_adapter_together_are_an_error_naming_both(comfy_folders, tiny):
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from eridiffusion.nodes.train import EriTrainSteps
    from eridiffusion.trainers.config import ConfigError
    p = prepared(comfy_folders, tiny, trigger_word="ohwx", preservation_class="person")
    adapter = run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp",
                  seed=0, dtype="fp32", text_encoder="clip_l", clip=p["clip"])[0]
    with pytest.raises(ConfigError, match="diff_output_preservation and a text-encoder adapter"):
        run(EriTrainSteps, model=p["model"], adapter=adapter, latents=p["latents"], captions=p["captions"],
            settings=settings(diff_output_preservation=True), steps=1, clip=p["clip"])
