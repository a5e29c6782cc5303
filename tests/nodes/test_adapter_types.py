"""LoRA, DoRA, LoKr, LoHa (and their LoCon convolution layers) end to end on tiny models: the file Save adapter
writes loads in ComfyUI's stock LoraLoaderModelOnly with the trained output, resumes bit-exactly, and files
of other trainers (kohya, LyCORIS, PEFT / diffusers, ComfyUI keys) continue training through Load adapter."""
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import model_output, prepared, run, train

# The stock-loader and resume checks run on every architecture; the rest on SDXL, the one with convolutions.
ARCHITECTURES = ("sdxl",)
ALL_ARCHITECTURES = ("sdxl", "sd3", "flux", "chroma", "qwen_image", "flux2", "zimage")

# Steps that change the tiny model's output by more than 1 % with every type (5 unless named): Flux.2 pads each
# caption to 512 tokens, whose attention dilutes what a few steps change (LoHa, second order at the start, moves
# its output 0.5 % in 5 steps, 2 % in 10)
TRAIN_STEPS = {"flux2": 10}
# adapter type id -> Create adapter inputs (beyond model, target, seed, dtype)
TYPES = {
    "lora": dict(adapter_type="lora", rank=4, alpha=2.0),
    "dora": dict(adapter_type="lora", rank=4, alpha=2.0, dora=True),
    "lokr": dict(adapter_type="lokr", rank=2, alpha=4.0),                 # w2 = w2_a · w2_b
    "lokr_full": dict(adapter_type="lokr", rank=2, alpha=4.0, lokr_full_w2=True, lokr_factor=4),
    "loha": dict(adapter_type="loha", rank=4, alpha=2.0),
    "lora_conv": dict(adapter_type="lora", rank=4, alpha=2.0, conv_layers=True, conv_rank=2, conv_alpha=1.0),
    "dora_conv": dict(adapter_type="lora", rank=4, alpha=4.0, dora=True, conv_layers=True),
    "lokr_conv": dict(adapter_type="lokr", rank=2, alpha=2.0, conv_layers=True),
    "loha_conv": dict(adapter_type="loha", rank=2, alpha=2.0, conv_layers=True, dora=True),
}
# suffixes each type's file must hold for every layer (linear, convolution)
FILE_SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "lokr_full": {"lokr_w1", "lokr_w2", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
}


@pytest.fixture(params=ARCHITECTURES)
def p(request, comfy_folders, tiny):
    return prepared(comfy_folders, tiny, request.param)


def on_every_architecture(type_ids):
    """(architecture, type) cases; convolution layers (LoCon) only where there are some: SDXL's UNet."""
    return [(arch, t) for arch in ALL_ARCHITECTURES for t in type_ids if arch == "sdxl" or "conv" not in t]


def create(p, type_id, **overrides):
    from eridiffusion.nodes.adapter import EriCreateAdapter
    kw = dict(model=p["model"], target="attention_mlp", seed=0, dtype="fp32", **TYPES[type_id])
    kw.update(overrides)
    return run(EriCreateAdapter, **kw)[0]


def save(adapter, prefix, dtype="fp32"):
    from eridiffusion.nodes.adapter import EriSaveAdapter
    return run(EriSaveAdapter, adapter=adapter, filename_prefix=prefix, save_dtype=dtype)[0]


def stock_load(p, name, caplog):
    from nodes import LoraLoaderModelOnly
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        (loaded,) = LoraLoaderModelOnly().load_lora_model_only(p["model"], name, 1.0)
    assert "lora key not loaded" not in caplog.text
    return loaded


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


def write_file(folder, name, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    return name


@pytest.mark.parametrize("arch,type_id", on_every_architecture(TYPES))
def test_a_new_adapter_changes_nothing_and_a_trained_one_loads_in_the_stock_loader_as_trained(
        comfy_folders, tiny, caplog, arch, type_id):
    p = prepared(comfy_folders, tiny, arch)
    from eridiffusion.trainers.state import patched_model
    adapter = create(p, type_id)
    base = model_output(p["model"], p)
    torch.testing.assert_close(model_output(patched_model(p["model"], adapter), p), base, rtol=1e-5, atol=1e-6)
    # the tiny Qwen-Image's output moves ~10x less per step than the others' (LoHa, the slowest to start, 0.7% in
    # 5 steps at 2e-2): a larger step, so that the loader is checked against a clearly trained output
    lr = 1e-1 if arch == "qwen_image" else 2e-2
    trained_model, trained, _ = train(p, TRAIN_STEPS.get(arch, 5), adapter=adapter, learning_rate=lr)
    expected = model_output(trained_model, p)
    assert relative_error(expected, base) > 1e-2, "training changed the output"
    name = save(trained, f"types/{type_id}")
    got = model_output(stock_load(p, name, caplog), p)
    assert relative_error(got, expected) <= 1e-3


@pytest.mark.parametrize("type_id", ["dora", "lokr", "lokr_full", "loha", "lora_conv", "loha_conv"])
def test_file_keys_are_what_comfyuis_loader_maps(p, comfy_folders, type_id):
    import comfy.lora
    adapter = create(p, type_id)
    tensors = load_file(str(comfy_folders["loras"] / save(adapter, f"keys/{type_id}")))
    key_map = comfy.lora.model_lora_keys_unet(p["model"].model, {})
    by_layer = {}
    for key in tensors:
        stem, suffix = key.split(".", 1)
        by_layer.setdefault(stem, set()).add(suffix)
    assert len(by_layer) == len(adapter.spec.targets) and all(stem in key_map for stem in by_layer)
    base_type = type_id.split("_conv")[0].replace("dora", "lora")
    for target in adapter.spec.targets:
        suffixes = by_layer["lora_unet_" + target[0].replace(".", "_")]
        wanted = FILE_SUFFIXES[base_type] | ({"dora_scale"} if adapter.spec.dora else set())
        assert suffixes == wanted, (target, suffixes)
    convs = [t for t in adapter.spec.targets if len(t) == 5]
    assert bool(convs) == adapter.spec.conv
    if convs:   # kohya's LoCon layers: ResBlock in/out/skip convs, Downsample op, Upsample conv
        paths = {t[0] for t in convs}
        assert {"input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3", "input_blocks.2.0.op",
                "output_blocks.1.2.conv", "input_blocks.3.0.skip_connection"} <= paths and "input_blocks.0.0" not in paths and "out.2" not in paths
        assert all(t[3:] in ((3, 3), (1, 1)) for t in convs)
    if type_id == "lora_conv":   # conv_rank 2, conv_alpha 1 for convolutions; rank 4, alpha 2 for the rest
        key = "lora_unet_input_blocks_1_0_in_layers_2"
        assert tensors[f"{key}.lora_down.weight"].shape == (2, 32, 3, 3)
        assert tensors[f"{key}.lora_up.weight"].shape == (32, 2, 1, 1) and tensors[f"{key}.alpha"].item() == 1.0
    if adapter.spec.dora:        # one magnitude per input column: the form ComfyUI applies as DoRA defines it
        for target in adapter.spec.targets:
            scale = tensors["lora_unet_" + target[0].replace(".", "_") + ".dora_scale"]
            assert scale.shape == ((1, target[1]) if len(target) == 3 else (1, target[1], 1, 1))
    if type_id == "lokr_full":   # lokr_factor 4: every size here splits as 4 · size/4
        for target in adapter.spec.targets:
            key = "lora_unet_" + target[0].replace(".", "_")
            assert tensors[f"{key}.lokr_w1"].shape == (4, 4)
            assert tensors[f"{key}.lokr_w2"].shape == (target[2] // 4, target[1] // 4)


@pytest.mark.parametrize("arch,type_id", on_every_architecture(["dora", "lokr", "loha", "loha_conv"]))
def test_resume_from_the_saved_state_continues_bit_exactly(comfy_folders, tiny, arch, type_id):
    p = prepared(comfy_folders, tiny, arch)
    from eridiffusion.nodes.adapter import EriLoadAdapter
    adapter = create(p, type_id)
    _, straight, _ = train(p, 4, adapter=adapter, schedule="cosine", warmup_steps=1)
    _, first, _ = train(p, 2, adapter=adapter, schedule="cosine", warmup_steps=1, total_steps=4)
    name = save(first, f"resume/{type_id}", dtype="fp16")
    resumed = run(EriLoadAdapter, lora_name=name, model=p["model"])[0]
    assert resumed.step == 2 and resumed.spec == adapter.spec
    _, second, _ = train(p, 2, adapter=resumed, schedule="cosine", warmup_steps=1, total_steps=4)
    assert second.history.losses == straight.history.losses
    assert straight.weights.keys() == second.weights.keys()
    assert all(torch.equal(straight.weights[k], second.weights[k]) for k in straight.weights)


def _foreign(tensors, style, spec, unet_config):
    """Our kohya file rewritten as another trainer writes it."""
    import comfy.utils
    from eridiffusion.trainers.adapters.base import file_key
    if style == "kohya":
        return dict(tensors)
    stems = {file_key(t[0]): t[0] for t in spec.targets}
    out = {}
    if style == "comfyui":
        for key, value in tensors.items():
            stem, suffix = key.split(".", 1)
            out[f"diffusion_model.{stems[stem]}.{suffix}"] = value
        return out
    assert style == "peft"   # PEFT / diffusers names, lora_A / lora_B, no alpha (the scale folded into B)
    diffusers = {v[:-len(".weight")]: k[:-len(".weight")]
                 for k, v in comfy.utils.unet_to_diffusers(unet_config).items()}
    for stem, path in stems.items():
        scale = tensors[f"{stem}.alpha"].item() / tensors[f"{stem}.lora_down.weight"].shape[0]
        out[f"unet.{diffusers[path]}.lora_A.weight"] = tensors[f"{stem}.lora_down.weight"]
        out[f"unet.{diffusers[path]}.lora_B.weight"] = tensors[f"{stem}.lora_up.weight"] * scale
    return out


@pytest.mark.parametrize("type_id,style", [("lora", "kohya"), ("lora", "peft"), ("lora", "comfyui"),
                                           ("dora", "comfyui"), ("lokr", "kohya"), ("lokr_full", "kohya"),
                                           ("loha_conv", "kohya"), ("lora_conv", "kohya")])
def test_a_file_of_another_trainer_loads_with_its_type_rank_and_layers_and_trains_on(
        p, comfy_folders, caplog, type_id, style):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    from eridiffusion.trainers.state import patched_model
    trained_model, trained, _ = train(p, 2, adapter=create(p, type_id), learning_rate=2e-2)
    ours = load_file(str(comfy_folders["loras"] / save(trained, "source")))
    name = write_file(comfy_folders["loras"], f"foreign_{type_id}_{style}.safetensors",
                      _foreign(ours, style, trained.spec, p["model"].model.model_config.unet_config))
    with pytest.raises(ValueError, match=f"foreign_{type_id}_{style}.safetensors.*connect the MODEL input"):
        run(EriLoadAdapter, lora_name=name)
    loaded = run(EriLoadAdapter, lora_name=name, model=p["model"])[0]
    spec, want = loaded.spec, trained.spec
    assert (spec.kind, spec.dora, spec.conv, spec.preset) == (want.kind, want.dora, want.conv, want.preset)
    assert sorted(spec.targets) == sorted(want.targets) and loaded.step == 0
    assert spec.alpha == (want.rank if style == "peft" else want.alpha)   # no alpha in the file: scale 1
    # a LoKr of full matrices has no rank; the others' is read from the tensors
    assert spec.rank == want.rank or (want.lokr_full_w2 and spec.lokr_full_w2)
    if want.conv:
        assert (spec.conv_rank or spec.rank, spec.conv_alpha or spec.alpha) == (want.conv_rank or want.rank,
                                                                                want.conv_alpha or want.alpha)
    expected = model_output(trained_model, p)
    assert relative_error(expected, model_output(p["model"], p)) > 1e-2
    assert relative_error(model_output(patched_model(p["model"], loaded), p), expected) <= 1e-3
    if style != "peft":   # ComfyUI 0.3.75 maps diffusers attention keys only with diffusers' old ".processor."
        assert relative_error(model_output(stock_load(p, name, caplog), p), expected) <= 1e-3
    _, continued, history = train(p, 2, adapter=loaded)
    assert continued.step == 2 and all(v == v for v in history.losses)
    assert any(not torch.equal(continued.weights[k], loaded.weights[k]) for k in loaded.weights)
    again = run(EriLoadAdapter, lora_name=save(continued, "continued"), model=p["model"])[0]
    assert again.step == 2 and again.spec == spec


def test_text_encoder_layers_of_a_file_are_skipped_with_a_warning(p, comfy_folders, caplog):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    ours = load_file(str(comfy_folders["loras"] / save(create(p, "lora"), "te")))
    ours["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    ours["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(64, 4)
    name = write_file(comfy_folders["loras"], "with_te.safetensors", ours)
    with caplog.at_level(logging.WARNING):
        loaded = run(EriLoadAdapter, lora_name=name, model=p["model"])[0]
    assert "1 text-encoder layers skipped" in caplog.text
    assert not any("lora_te" in t[0] for t in loaded.spec.targets)


def test_a_file_for_another_architecture_is_a_clear_error(p, comfy_folders):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    flux_keys = {f"lora_unet_double_blocks_0_img_attn_proj.{s}": torch.zeros(shape)
                 for s, shape in (("lora_down.weight", (4, 64)), ("lora_up.weight", (64, 4)), ("alpha", ()))}
    name = write_file(comfy_folders["loras"], "flux_lora.safetensors", flux_keys)
    with pytest.raises(ValueError, match=r"flux_lora.safetensors: 1 of 1 layers match no layer of this sdxl MODEL"
                                         r".*made for Flux. Connect a MODEL of that architecture"):
        run(EriLoadAdapter, lora_name=name, model=p["model"])
    # one of ours, saved for another architecture (its metadata says so)
    from safetensors import safe_open
    ours = save(create(p, "lora"), "other_arch")
    path = comfy_folders["loras"] / ours
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    (path.with_suffix(".eri-state")).unlink()
    meta["eri.spec"] = meta["eri.spec"].replace('"arch": "sdxl"', '"arch": "flux"')
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ValueError, match="is a flux adapter but the MODEL connected to Load adapter is sdxl: "
                                         "connect a flux MODEL"):
        run(EriLoadAdapter, lora_name=ours, model=p["model"])


@pytest.mark.parametrize("suffix,shape,message", [
    ("oft_blocks", (4, 8, 8), "holds OFT"),
    ("lokr_t2", (2, 2, 3, 3), r"holds LoKr with Tucker decomposition \(lokr_t2\)"),
    ("dora_scale", None, r"one magnitude per output channel"),
])
def test_an_adapter_type_that_cannot_be_trained_is_a_clear_error(p, comfy_folders, suffix, shape, message):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    ours = load_file(str(comfy_folders["loras"] / save(create(p, "dora"), "bad")))
    stem = next(k for k in ours if k.endswith(".alpha"))[:-len(".alpha")]
    if suffix == "dora_scale":   # LyCORIS' wd_on_out form: one magnitude per output channel
        shape = (ours[f"{stem}.lora_up.weight"].shape[0], 1)
    else:
        ours = {k: v for k, v in ours.items() if not k.endswith(".dora_scale")}
    ours[f"{stem}.{suffix}"] = torch.ones(shape)
    name = write_file(comfy_folders["loras"], f"bad_{suffix}.safetensors", ours)
    with pytest.raises(ValueError, match=f"bad_{suffix}.safetensors.*{message}"):
        run(EriLoadAdapter, lora_name=name, model=p["model"])


def test_create_adapter_errors_name_the_input(p, tiny):
    with pytest.raises(ValueError, match="lokr_factor must be -1 .* or a positive number"):
        create(p, "lokr", lokr_factor=-3)
    with pytest.raises(ValueError, match=r"conv_rank 64 is larger than layer .* choose conv_rank <="):
        create(p, "lora_conv", conv_rank=64, target="attention")


@pytest.mark.parametrize("type_id", ["dora_conv", "lokr_conv", "loha"])
def test_every_type_trains_in_bf16_with_gradient_checkpointing(p, type_id):
    adapter = create(p, type_id)
    _, trained, history = train(p, 2, adapter=adapter, precision="bf16", gradient_checkpointing=True)
    assert all(v == v for v in history.losses)
    changed = {k for k in adapter.weights if not torch.equal(adapter.weights[k], trained.weights[k])}
    assert changed == set(adapter.weights), "every parameter (DoRA magnitudes included) trains"
