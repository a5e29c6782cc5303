"""Settings that only some architectures use. The canvas shows every input whatever MODEL is connected: the
tooltip of such an input names its architectures first, and one set for a model that does not use it changes
nothing in training and says so in the log."""
import logging

import pytest
import torch

from helpers import prepared, run, train

# Input -> the words its tooltip starts with. Timestep sampling (and logit_mean, logit_std, sigmoid_scale) is
# not here: SDXL draws its 1000 discrete timesteps by it too.
ONLY = {
    ("EriTrainingSettings", "min_snr_gamma"): "SDXL only: ",
    ("EriTrainingSettings", "timestep_shift"): "SD 3.5 / Flux / Chroma / Qwen-Image / Flux.2 / Z-Image only: ",
    ("EriTrainingSettings", "loss_weighting"): "SD 3.5 / Flux / Chroma / Qwen-Image / Flux.2 / Z-Image only: ",
    ("EriTrainingSettings", "flux_guidance"): "Flux / Flux.2 only: ",
    ("EriTrainingSettings", "fp8_compute"): "SD 3.5 / Flux / Chroma / Qwen-Image / Flux.2 / Z-Image only: ",
    ("EriCreateAdapter", "conv_layers"): "SDXL only: ",
    ("EriCreateAdapter", "conv_rank"): "SDXL only: ",
    ("EriCreateAdapter", "conv_alpha"): "SDXL only: ",
    ("EriSamplingSettings", "guidance"): "Flux / Flux.2 only: ",
}
ARCH_NAMES = ("SDXL", "SD 3.5", "Flux", "Chroma", "Qwen-Image", "Flux.2", "Z-Image")


def test_each_input_that_only_some_architectures_use_names_them_first_in_its_tooltip_and_no_other_does():
    from eridiffusion.nodes import ALL_NODES
    tooltips = {(node.define_schema().node_id, i.id): i.tooltip for node in ALL_NODES
                for i in node.define_schema().inputs}
    for key, words in ONLY.items():
        assert tooltips[key].startswith(words), f"{key}: {tooltips[key]}"
        assert len(tooltips[key]) > len(words) + 20, "and then says what it does"
    claims = {key for key, tip in tooltips.items() if tip and tip.split(" only: ")[0] in
              {" / ".join(names) for names in (("SDXL",), ("SD 3.5",), ("Flux",), ("SD 3.5", "Flux"),
                                                  ("SD 3.5", "Flux", "Chroma"), ("Flux", "Flux.2"),
                                                  ("SD 3.5", "Flux", "Chroma", "Qwen-Image", "Flux.2", "Z-Image"))}}
    assert claims == set(ONLY)


def trained(p, steps=3, **settings):
    """Losses and adapter weights after `steps` steps with `settings`, and what training logged."""
    _, adapter, _ = train(p, steps, gradient_checkpointing=False, **settings)
    return adapter.history.losses, adapter.weights


def assert_same(a, b):
    assert a[0] == b[0], "the same losses"
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1]), "bit-identical weights"


@pytest.mark.parametrize("arch, ignored", [
    ("sdxl", dict(timestep_shift=3.0, loss_weighting="cosmap", flux_guidance=3.5, fp8_compute=True)),
    ("sd3", dict(min_snr_gamma=5.0, flux_guidance=3.5)),
    ("flux", dict(min_snr_gamma=5.0)),
    ("flux_schnell", dict(min_snr_gamma=5.0, flux_guidance=3.5)),   # schnell has no guidance input
    ("qwen_image", dict(min_snr_gamma=5.0, flux_guidance=3.5)),
    ("zimage", dict(min_snr_gamma=5.0, flux_guidance=3.5)),
])
def test_a_setting_for_another_architecture_changes_nothing_and_the_log_names_it(comfy_folders, tiny, caplog, arch,
                                                                                 ignored):
    p = prepared(comfy_folders, tiny, arch=arch)
    plain = trained(p)
    with caplog.at_level(logging.WARNING):
        assert_same(trained(p, **ignored), plain)
    warned = [r.getMessage() for r in caplog.records if " is ignored: " in r.getMessage()]
    assert sorted(m.split("EriDiffusion: ")[1].split(" ")[0] for m in warned) == sorted(ignored), warned


def test_settings_that_apply_to_the_architecture_train_differently_and_warn_of_nothing(comfy_folders, tiny, caplog):
    p = prepared(comfy_folders, tiny, arch="flux")
    plain = trained(p)
    with caplog.at_level(logging.WARNING):
        shifted = trained(p, timestep_shift=3.0, loss_weighting="cosmap", flux_guidance=3.5)
    assert shifted[0] != plain[0]
    assert " is ignored: " not in caplog.text


def test_conv_rank_without_conv_layers_is_ignored_with_a_warning_and_conv_layers_on_a_dit_is_refused(
        comfy_folders, tiny, caplog):
    from eridiffusion.nodes.adapter import EriCreateAdapter
    p = prepared(comfy_folders, tiny, arch="sdxl")
    common = dict(model=p["model"], adapter_type="lora", rank=4, alpha=4.0, target="attention_mlp", seed=0,
                  dtype="fp32")
    with caplog.at_level(logging.WARNING):
        adapter = run(EriCreateAdapter, **common, conv_rank=8, conv_alpha=2.0)[0]
    assert "conv_rank 8 and conv_alpha 2.0 are ignored" in caplog.text
    assert adapter.spec.targets == p["adapter"].spec.targets, "no convolution adapted"
    with torch.inference_mode(False):
        flux = tiny.tiny_model("flux")
    with pytest.raises(ValueError, match="conv_layers is on but this flux MODEL has no UNet convolution layers"):
        run(EriCreateAdapter, **{**common, "model": flux}, conv_layers=True)
