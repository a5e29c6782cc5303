"""memory_budget_gb: the frozen base weights past the budget stay in CPU memory and ComfyUI streams them in per
layer (comfy_cast_weights), in the forward pass and in the checkpointed blocks' recomputation; training computes
what it computes with the whole model loaded. Tiny models on the CPU, where ComfyUI's load and offload devices
are both the CPU: what streams is seen by the layers ComfyUI marks, and the forward takes the cast path."""
import pytest
import torch

from helpers import prepared, settings

OPTIONS = dict(batch_size=2, gradient_checkpointing=True, learning_rate=1e-2)
STEPS = 3


def trained(p, on_step=None, **overrides):
    from eridiffusion.trainers.loop import train
    with torch.inference_mode(False):
        return train(p["model"], p["adapter"], p["latents"], p["captions"], settings(**{**OPTIONS, **overrides}),
                     STEPS, on_step=on_step)


def castable(model) -> list[str]:
    """The layers ComfyUI can stream: comfy.ops' layers (a LayerNorm without weights among them)."""
    return [name for name, m in model.named_modules() if hasattr(m, "comfy_cast_weights")]


def watched(p):
    """An on_step callback recording, at each step, which layers stream, and the list it fills."""
    from eridiffusion.trainers.offload import streamed_layers
    seen = []
    return (lambda report: seen.append(set(streamed_layers(p["model"].model.diffusion_model)))), seen


def assert_same_training(budgeted, full):
    assert budgeted.history.losses == pytest.approx(full.history.losses, rel=1e-5, abs=1e-7)
    assert budgeted.weights.keys() == full.weights.keys()
    for key in full.weights:
        torch.testing.assert_close(budgeted.weights[key], full.weights[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_a_budget_below_the_models_size_streams_its_layers_and_trains_the_same(comfy_folders, tiny, arch):
    p = prepared(comfy_folders, tiny, arch=arch)
    watch, unconstrained = watched(p)
    full = trained(p, watch)
    assert unconstrained == [set()] * STEPS     # budget 0: everything loaded, nothing streams (today's path)
    watch, streaming = watched(p)
    budgeted = trained(p, watch, memory_budget_gb=1e-4)     # 100 KiB: below the training's own needs
    everything = set(castable(p["model"].model.diffusion_model))
    assert len(everything) > 20
    assert streaming == [everything] * STEPS    # every layer ComfyUI can stream does, through every step
    assert_same_training(budgeted, full)
    watch, again = watched(p)
    trained(p, watch)
    assert again == [set()] * STEPS             # a run without a budget afterwards loads the whole model again


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_a_budget_for_part_of_the_weights_keeps_the_rest_on_the_device(comfy_folders, tiny, monkeypatch, arch):
    from eridiffusion.trainers import offload
    p = prepared(comfy_folders, tiny, arch=arch)
    full = trained(p)
    monkeypatch.setattr(offload, "training_needs", lambda *args: 0)   # the whole budget for weights
    monkeypatch.setattr(offload, "staged_bytes", lambda blocks: 0)
    size = p["model"].model_size()
    watch, streaming = watched(p)
    budgeted = trained(p, watch, memory_budget_gb=size * 0.4 / offload.GIB)
    everything = set(castable(p["model"].model.diffusion_model))
    assert 0 < len(streaming[0]) < len(everything)
    assert streaming == [streaming[0]] * STEPS
    assert p["model"].loaded_size() <= size * 0.4
    assert_same_training(budgeted, full)


def test_streamed_weights_turn_cuda_graphs_off_and_say_why(caplog):
    from eridiffusion.trainers.loop import uses_graphs
    cuda, graphs = torch.device("cuda"), settings(compile="cuda_graphs")
    with caplog.at_level("INFO"):
        assert uses_graphs(graphs, cuda, text_encoder=False, streams=False)
        assert "CUDA graphs are off" not in caplog.text
        assert not uses_graphs(graphs, cuda, text_encoder=False, streams=True)
    assert "CUDA graphs are off while memory_budget_gb streams weights" in caplog.text
    assert not uses_graphs(graphs, torch.device("cpu"), text_encoder=False, streams=False)
    assert not uses_graphs(settings(compile="off"), cuda, text_encoder=False, streams=False)


def test_the_out_of_memory_advice_names_a_budget_that_fits_the_card():
    from eridiffusion.trainers.offload import GIB, budget_advice, tried_to_allocate
    assert tried_to_allocate(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")) == 20 * GIB
    assert tried_to_allocate(RuntimeError("Tried to allocate 512.00 MiB. GPU 0 has")) == 512 << 20
    assert tried_to_allocate(RuntimeError("out of memory")) == 0
    # Flux-dev fp8 (16.16 GiB measured) on a 12 GB card (~11.6 GiB) with no budget: the card's memory less 10%
    advice = budget_advice(0.0, int(16.16 * GIB), int(11.6 * GIB), int(11.1 * GIB))
    assert advice == ("the step needed at least 16.2 GiB and the GPU has 11.6 GiB: set memory_budget_gb to 10 "
                      "(Training settings) to keep part of the model's weights (11.1 GiB on the GPU) in CPU memory "
                      "and stream them")
    # a budget whose estimate fell 1.3 GiB short: lowered by that and half a GiB
    advice = budget_advice(10.0, int(12.9 * GIB), int(11.6 * GIB), int(5 * GIB))
    assert "memory_budget_gb is 10; lower it to 8 (Training settings)" in advice
    # streaming every resident weight would not make up the shortfall
    assert budget_advice(4.0, int(20 * GIB), int(11.6 * GIB), int(2 * GIB)).startswith("memory_budget_gb cannot help")
    assert budget_advice(0.0, 0, 0, 0) == ""     # not CUDA: nothing measured


def test_out_of_memory_on_the_gpu_suggests_the_budget_in_the_error(comfy_folders, tiny, monkeypatch):
    from eridiffusion.trainers import offload
    from eridiffusion.trainers.loop import TrainingError, TrainingRun
    p = prepared(comfy_folders, tiny, arch="sdxl")

    def out_of_memory(self, *args):
        monkeypatch.setattr(self.patcher, "loaded_size", lambda: int(11.1 * offload.GIB))   # Flux-dev fp8's weights
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(TrainingRun, "_loss", out_of_memory)
    # what torch.cuda reports on a 12 GB card (the CPU run has no CUDA memory to read)
    monkeypatch.setattr(offload, "device_memory", lambda device, error: (int(13.5 * offload.GIB),
                                                                         int(11.6 * offload.GIB)))
    with pytest.raises(TrainingError, match=r"out of GPU memory at step 1 .* or turn optimizer_offload on; the step "
                                            r"needed at least 13.5 GiB and the GPU has 11.6 GiB: set "
                                            r"memory_budget_gb to 10 \(Training settings\)"):
        trained(p)


@pytest.mark.parametrize("arch, type_id", [("flux", "dora"), ("flux", "lokr"), ("sdxl", "loha_conv"),
                                           ("sdxl", "dora_conv")])
def test_every_adapter_type_sees_the_streamed_base_weight(comfy_folders, tiny, arch, type_id):
    """DoRA reads the base weight itself (its norm): through ComfyUI's cast, as the layer's forward does."""
    from test_adapter_types import create
    p = prepared(comfy_folders, tiny, arch=arch)
    p["adapter"] = create(p, type_id)
    full = trained(p)
    watch, streaming = watched(p)
    budgeted = trained(p, watch, memory_budget_gb=1e-4)
    assert streaming[0] == set(castable(p["model"].model.diffusion_model))
    assert_same_training(budgeted, full)


def test_fp8_weights_stream_and_are_cast_per_layer_as_without_a_budget(comfy_folders, tiny):
    """ComfyUI's weight_dtype fp8_e4m3fn: the streamed fp8 weights are copied as they are stored and cast to bf16."""
    from eridiffusion.nodes.adapter import EriCreateAdapter
    from helpers import run
    p = prepared(comfy_folders, tiny, arch="flux")
    with torch.inference_mode(False):
        p["model"] = tiny.tiny_model("flux", dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    p["adapter"] = run(EriCreateAdapter, model=p["model"], adapter_type="lora", rank=4, alpha=4.0,
                       target="attention_mlp", seed=0, dtype="bf16")[0]
    watch, unconstrained = watched(p)
    full = trained(p, watch, precision="bf16")
    watch, streaming = watched(p)
    budgeted = trained(p, watch, precision="bf16", memory_budget_gb=1e-4)
    assert unconstrained[0] == set()
    assert streaming[0] == set(castable(p["model"].model.diffusion_model))
    assert budgeted.history.losses == pytest.approx(full.history.losses, rel=1e-2)
    for key in full.weights:
        torch.testing.assert_close(budgeted.weights[key], full.weights[key], rtol=2e-2, atol=1e-3)


def test_training_with_a_budget_resumes_bit_exactly(comfy_folders, tiny):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    from eridiffusion.nodes.train import EriTrainSteps
    from helpers import run
    p = prepared(comfy_folders, tiny, arch="flux")

    def train_node(steps, adapter, **node_inputs):
        return run(EriTrainSteps, model=p["model"], adapter=adapter, latents=p["latents"], captions=p["captions"],
                   settings=settings(**OPTIONS, memory_budget_gb=1e-4), steps=steps, **node_inputs)[1]
    straight = train_node(4, p["adapter"])
    train_node(2, p["adapter"], save_every=2, save_prefix="budget/run")
    resumed = run(EriLoadAdapter, lora_name="budget/run_000002.safetensors")[0]
    assert resumed.settings["memory_budget_gb"] == 1e-4
    continued = train_node(2, resumed)
    assert continued.history.losses == straight.history.losses
    assert all(torch.equal(straight.weights[k], continued.weights[k]) for k in straight.weights)


def test_streamed_weights_are_copied_on_the_compute_stream_while_a_micro_batch_trains(comfy_folders, tiny,
                                                                                       monkeypatch):
    """ComfyUI's async-offload side streams (NUM_STREAMS, 2 on NVIDIA) are for inference: autograd keeps copies of
    a recomputed block until its backward, which those streams never wait for (trainers/offload.py)."""
    import comfy.model_management
    from eridiffusion.trainers.loop import TrainingRun
    p = prepared(comfy_folders, tiny, arch="sdxl")
    monkeypatch.setattr(comfy.model_management, "NUM_STREAMS", 2)
    seen = []
    original = TrainingRun._loss

    def watch(self, inputs):
        seen.append(comfy.model_management.NUM_STREAMS)
        return original(self, inputs)
    monkeypatch.setattr(TrainingRun, "_loss", watch)
    trained(p)
    trained(p, memory_budget_gb=1e-4)
    assert seen == [2] * STEPS + [0] * STEPS
    assert comfy.model_management.NUM_STREAMS == 2


def test_a_text_encoder_adapter_trains_the_same_while_the_diffusion_models_weights_stream(comfy_folders, tiny):
    from test_text_encoder import _prepared, _train
    p = _prepared(comfy_folders, tiny, "sdxl")
    _, full, _, _, _ = _train(p, STEPS, gradient_checkpointing=True)
    _, budgeted, _, _, _ = _train(p, STEPS, gradient_checkpointing=True, memory_budget_gb=1e-4)
    assert p["model"].model.model_lowvram          # (ComfyUI's own flag: the model is loaded in part)
    assert any(k.startswith("text_encoders.") for k in full.weights)
    assert_same_training(budgeted, full)


def test_a_budget_below_the_trainings_own_needs_streams_everything_and_warns(comfy_folders, tiny, caplog):
    p = prepared(comfy_folders, tiny, arch="sdxl")
    with caplog.at_level("INFO"):
        trained(p, memory_budget_gb=1e-4)
    assert "memory_budget_gb 0.0001 is below what the training itself is estimated to need" in caplog.text


def test_a_budget_with_the_layer_outputs_kept_trains_the_same_and_says_the_budget_may_not_hold(comfy_folders,
                                                                                                 tiny, caplog):
    p = prepared(comfy_folders, tiny, arch="sdxl")
    full = trained(p, memory_budget_gb=1e-4)
    assert "recompute_layers off" not in caplog.text
    with caplog.at_level("WARNING"):
        kept = trained(p, memory_budget_gb=1e-4, recompute_layers=False)
    assert "recompute_layers off keeps their layers' outputs on the GPU until backward" in caplog.text
    assert_same_training(kept, full)


def test_the_budget_holds_again_after_sampling_loaded_other_models_between_steps(comfy_folders, tiny):
    """Sampling every N steps (on_every) may unload the training clone; it is loaded again within the budget."""
    import comfy.model_management
    from eridiffusion.trainers.loop import train
    p = prepared(comfy_folders, tiny, arch="flux")
    full = trained(p)
    watch, streaming = watched(p)
    with torch.inference_mode(False):
        budgeted = train(p["model"], p["adapter"], p["latents"], p["captions"],
                         settings(**OPTIONS, memory_budget_gb=1e-4), STEPS, on_step=watch,
                         on_every=lambda run: comfy.model_management.unload_all_models(), every=1)
    assert streaming == [set(castable(p["model"].model.diffusion_model))] * STEPS
    assert_same_training(budgeted, full)


def test_the_training_needs_estimate_covers_what_was_measured_on_an_h200(tiny, monkeypatch):
    """The whole run's peak less the weights, measured at 1024², batch 1, LoRA r16 (issue 21): SDXL 1.93 GiB, SD 3.5
    Large 3.24 GiB, Flux-dev 4.78 GiB; ComfyUI's inference estimate, read as on an NVIDIA GPU (flash attention), is
    far below. Not so far above either that a budget the model fits in streams weights (a 24 GiB budget for Flux-dev
    bf16, 22.2 GiB of weights, did with one factor for every architecture). (Tiny models: the same classes, hence
    the same memory factors, as the full-size ones.)"""
    import comfy.model_management
    from eridiffusion.trainers.arch import detect
    from eridiffusion.trainers.offload import GIB, training_needs
    monkeypatch.setattr(comfy.model_management, "pytorch_attention_flash_attention", lambda: True)
    measured = {"sdxl": ((1, 4, 128, 128), 1.93), "sd3": ((1, 16, 128, 128), 3.24), "flux": ((1, 16, 128, 128), 4.78)}
    for arch, (shape, gib) in measured.items():
        with torch.inference_mode(False):
            model = tiny.tiny_model(arch, dtype=torch.bfloat16)
        needs = training_needs([], False, model.model, [shape], detect(model).activation_factor)
        assert gib * GIB <= needs <= 1.5 * gib * GIB, arch


def test_a_budget_the_whole_model_fits_in_streams_nothing(comfy_folders, tiny, monkeypatch):
    """Where the weights and the training's needs fit the budget, nothing streams: the two blocks BlockPrefetcher
    would stage are counted only when weights stream (SDXL at 8 GiB streamed 611 layers, 12x slower, before)."""
    from eridiffusion.trainers import offload
    p = prepared(comfy_folders, tiny, arch="sdxl")
    size = p["model"].model_size()
    monkeypatch.setattr(offload, "training_needs", lambda *args: size // 2)
    monkeypatch.setattr(offload, "staged_bytes", lambda blocks: size)
    watch, streaming = watched(p)
    trained(p, watch, memory_budget_gb=size * 1.6 / offload.GIB)
    assert streaming == [set()] * STEPS
    watch, streaming = watched(p)
    trained(p, watch, memory_budget_gb=size * 1.4 / offload.GIB)      # does not fit: streams, staging counted
    assert streaming and all(streaming)


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_the_next_blocks_weights_are_staged_ahead_and_the_model_gets_its_own_back(comfy_folders, tiny, monkeypatch,
                                                                                   arch):
    """BlockPrefetcher (on a GPU: copies on a side stream while the block before computes). On the CPU it is
    switched on by hand, where staging clones the weights: training is unchanged; from the second micro-batch on,
    every block finds its weights staged already (the order of the forward pass and of the recomputation in
    backward is learnt from the micro-batch before); after training every layer of the shared MODEL holds its own
    parameter objects again."""
    from eridiffusion.trainers import offload
    p = prepared(comfy_folders, tiny, arch=arch)
    root = p["model"].model.diffusion_model
    own = {name: param for name, param in root.named_parameters()}
    full = trained(p)
    monkeypatch.setattr(offload, "PREFETCH_DEVICES", {"cuda", "cpu"})
    micro_batches = []
    running, micro_batch = offload.BlockPrefetcher.running, offload.BlockPrefetcher.micro_batch

    def watch_micro_batch(self):
        micro_batches.append([])
        return micro_batch(self)

    def watch_running(self, index):
        micro_batches[-1].append((index, index in self.staged))
        return running(self, index)
    monkeypatch.setattr(offload.BlockPrefetcher, "micro_batch", watch_micro_batch)
    monkeypatch.setattr(offload.BlockPrefetcher, "running", watch_running)
    budgeted = trained(p, memory_budget_gb=1e-4)
    assert_same_training(budgeted, full)
    order = [index for index, _ in micro_batches[0]]
    # every block in the forward pass, then the recomputation of those backward reaches (not the first blocks of
    # the tiny SDXL: no adapter layer there or before them)
    assert len(set(order)) >= 2 and len(set(order)) < len(order) <= 2 * len(set(order))
    assert len(micro_batches) == STEPS
    assert all([index for index, _ in entered] == order for entered in micro_batches)
    assert all(staged for entered in micro_batches[1:] for _, staged in entered)
    assert all(param is own[name] for name, param in root.named_parameters())


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
@pytest.mark.parametrize("budget", [0.0, 1e-4], ids=["whole_model", "streamed"])
def test_a_model_loaded_under_inference_mode_trains(comfy_folders, tiny, arch, budget):
    """ComfyUI runs every node under torch.inference_mode: a MODEL a sampler moved to the GPU before training
    holds inference tensors, which autograd cannot save for backward (seen on an H200). Here the tiny model's
    weights are remade under inference mode; training replaces those on the device by normal copies and trains
    as the same model without them does."""
    p = prepared(comfy_folders, tiny, arch=arch)
    full = trained(p, memory_budget_gb=budget)
    with torch.inference_mode():
        p["model"].model.diffusion_model.to(torch.float64).to(torch.float32)
    assert all(w.is_inference() for w in p["model"].model.diffusion_model.parameters())
    again = trained(p, memory_budget_gb=budget)
    assert_same_training(again, full)
