"""Our LoRA, LoHa and LoKr compute what PEFT's do with the same weights: PEFT is the reference implementation
of all three (LoraConfig, LoHaConfig, LoKrConfig), here run on a small torch module whose adapter weights are
random (not PEFT's zero-output initialisation) and copied into our layers."""
import pytest
import torch

peft = pytest.importorskip("peft")

from eridiffusion.trainers import adapters  # noqa: E402
from eridiffusion.trainers.config import AdapterSpec  # noqa: E402

RANK, ALPHA = 2, 3.0
TARGETS = (("proj", 48, 64), ("conv", 16, 32, 3, 3))
# PEFT parameter (a ModuleDict / ParameterDict entry of adapter "default") -> our key suffix
NAMES = {
    "lora": {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"},
    "loha": {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    "lokr": {n: n for n in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_w2")},
}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 64)
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)


def peft_model(kind: str, rank: int = RANK):
    torch.manual_seed(0)
    net = Net().double()
    config = {"lora": lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj", "conv"]),
              "loha": lambda: peft.LoHaConfig(r=RANK, alpha=ALPHA, target_modules=["proj", "conv"]),
              # rank 2 < half of w2's sizes: w2 = w2_a · w2_b, scaled by alpha / rank in PEFT and ComfyUI alike
              "lokr": lambda: peft.LoKrConfig(r=rank, alpha=ALPHA, target_modules=["proj", "conv"])}[kind]()
    model = peft.get_peft_model(net, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(n in name for n in NAMES[kind]):
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
    return model


def weights_from(model, kind: str) -> dict[str, torch.Tensor]:
    """PEFT's adapter weights under our keys (`<module path>.<suffix>`)."""
    weights = {}
    for name, param in model.named_parameters():
        for peft_name, suffix in NAMES[kind].items():
            if f".{peft_name}." in name or name.endswith(f".{peft_name}.default"):
                path = name.split(f".{peft_name}")[0].removeprefix("base_model.model.")
                weights[f"{path}.{suffix}"] = param.detach().clone()
    return weights


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_our_adapter_layers_give_peft_s_outputs_with_the_same_weights(kind):
    model = peft_model(kind)
    weights = weights_from(model, kind)
    assert kind != "lokr" or {"proj.lokr_w2_a", "conv.lokr_w2_b"} <= set(weights)
    spec = AdapterSpec(arch="sdxl", kind=kind, rank=RANK, alpha=ALPHA, targets=TARGETS)
    ours = adapters.method(kind).build_layers(spec, weights, torch.float64)
    assert {f"{p}.{s}" for p, layer in ours.items() for s in layer.tensors()} == set(weights)
    generator = torch.Generator().manual_seed(2)
    inputs = {"proj": torch.randn(5, 48, generator=generator, dtype=torch.float64),
              "conv": torch.randn(2, 16, 6, 6, generator=generator, dtype=torch.float64)}
    net = model.get_base_model()
    for path, x in inputs.items():
        wrapped = net.get_submodule(path)      # PEFT's layer: base output plus its adapter's
        base_layer = wrapped.get_base_layer()
        expected = wrapped(x)
        got = ours[path].apply(base_layer, x, base_layer.forward)
        with torch.no_grad():
            assert not torch.allclose(expected, base_layer(x)), "the adapter changes the output"
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        # and the merged weight, what ComfyUI's loader adds to the layer
        with torch.no_grad():
            torch.testing.assert_close(ours[path].diff_weight(), wrapped.get_delta_weight("default"),
                                       rtol=1e-10, atol=1e-10)


def test_lokr_with_a_full_w2_is_scaled_as_comfyuis_loader_scales_it_not_as_peft():
    # A rank of at least half of w2's sizes makes w2 full (PEFT and LyCORIS alike). ComfyUI's loader, which reads
    # the files we write, then applies no alpha / rank scale, where PEFT keeps it: the one intended difference.
    model = peft_model("lokr", rank=8)
    weights = weights_from(model, "lokr")
    assert "proj.lokr_w2" in weights
    spec = AdapterSpec(arch="sdxl", kind="lokr", rank=8, alpha=ALPHA, targets=TARGETS)
    ours = adapters.method("lokr").build_layers(spec, weights, torch.float64)
    peft_delta = model.get_base_model().proj.get_delta_weight("default")
    with torch.no_grad():
        torch.testing.assert_close(ours["proj"].diff_weight() * ALPHA / 8, peft_delta, rtol=1e-10, atol=1e-10)
