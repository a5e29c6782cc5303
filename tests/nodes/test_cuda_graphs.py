"""Training with CUDA graphs (compile cuda_graphs) gives what training without them gives, on every
architecture, through buckets, partial batches, accumulation and checkpointing; a forward that cannot be
captured trains eagerly instead; graphs are re-captured after other models were loaded in between.

These need a GPU: `ERI_TEST_DEVICE=cuda scripts/test -m gpu` on a GPU machine. On the CPU they are skipped."""
import logging

import pytest
import torch

from helpers import prepared, settings, with_reg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("comfy.cli_args").cli_args.args.cpu,
    reason="CUDA graphs need a GPU (ERI_TEST_DEVICE=cuda)")]

# two buckets (64x64, 64x128); with batch 2 the 3-image bucket ends with a partial batch
SIZES = ((64, 64),) * 3 + ((64, 128),) * 2
OPTIONS = dict(batch_size=2, grad_accumulation=2, gradient_checkpointing=True, precision="bf16",
               learning_rate=1e-3, caption_dropout=0.2, noise_offset=0.05)


@pytest.fixture
def captures(monkeypatch):
    from eridiffusion.trainers.graphs import GraphedMicroBatches
    made = []
    original = GraphedMicroBatches._capture

    def capture(self, inputs):
        entry = original(self, inputs)
        made.append(entry is not None)
        return entry
    monkeypatch.setattr(GraphedMicroBatches, "_capture", capture)
    return made


def train_node(p, steps, on_every=None, **overrides):
    from eridiffusion.trainers.loop import train
    state = p["adapter"]
    with torch.inference_mode(False):
        return train(p["model"], state, p["latents"], p["captions"], settings(**{**OPTIONS, **overrides}), steps,
                     on_every=on_every, every=3 if on_every else 0)


def assert_same_training(graphed, eager):
    assert graphed.step == eager.step
    assert graphed.history.losses == pytest.approx(eager.history.losses, rel=1e-5)
    for key in eager.weights:
        assert torch.allclose(graphed.weights[key], eager.weights[key], rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux", "zimage", "qwen_image", "flux2", "sdxl_fp16"])
def test_graphed_training_equals_eager_training(comfy_folders, tiny, captures, arch):
    p = prepared(comfy_folders, tiny, arch=arch.removesuffix("_fp16"), sizes=SIZES)
    if arch.endswith("_fp16"):      # as ComfyUI loads SDXL on most GPUs: precision auto trains it in fp16,
        with torch.inference_mode(False):       # with loss scaling, inside the graph too
            p["model"] = tiny.tiny_model("sdxl", dtype=torch.float16)
        eager = train_node(p, 12, compile="off", precision="auto")
        assert eager.settings["precision"] == "auto"
        graphed = train_node(p, 12, compile="cuda_graphs", precision="auto")
        assert captures and all(captures)
        return assert_same_training(graphed, eager)
    eager = train_node(p, 12, compile="off")
    assert captures == []
    graphed = train_node(p, 12, compile="cuda_graphs")
    assert captures and all(captures), captures        # every bucket and batch shape was captured
    assert_same_training(graphed, eager)


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_graphed_training_with_regularisation_images_and_output_preservation_equals_eager(comfy_folders, tiny,
                                                                                       captures, arch):
    # each micro-batch: the training batch with the class caption's passes (the adapter off, then on) and a
    # regularisation batch with its weight; the adapter switch is captured as it was during capture
    p = with_reg(prepared(comfy_folders, tiny, arch=arch, sizes=SIZES, trigger_word="ohwx",
                          preservation_class="person"), comfy_folders, sizes=SIZES[1:])
    options = dict(reg_weight=0.5, diff_output_preservation=True, diff_output_preservation_multiplier=2.0)
    eager = train_node(p, 12, compile="off", **options)
    graphed = train_node(p, 12, compile="cuda_graphs", **options)
    assert captures and all(captures), captures
    assert_same_training(graphed, eager)
    assert eager.history.losses != train_node(p, 12, compile="off").history.losses   # (they did train)


def test_a_forward_that_syncs_with_the_host_trains_eagerly_with_a_warning(comfy_folders, tiny, captures,
                                                                         monkeypatch, caplog):
    from eridiffusion.trainers.loop import TrainingRun
    p = prepared(comfy_folders, tiny, arch="sdxl", sizes=SIZES)
    eager = train_node(p, 8, compile="off")
    original = TrainingRun._loss

    def syncing_loss(self, inputs):
        loss = original(self, inputs)
        if loss.item() > 1e9:           # a host read: not allowed while a graph is captured
            raise AssertionError("unreachable")
        return loss
    monkeypatch.setattr(TrainingRun, "_loss", syncing_loss)
    with caplog.at_level(logging.WARNING):
        graphed = train_node(p, 8, compile="cuda_graphs")
    assert captures and not any(captures)
    assert "CUDA graph capture failed" in caplog.text
    assert_same_training(graphed, eager)


def test_the_optimizer_reads_a_replayed_graphs_own_gradients_and_trains_what_a_copy_trains(comfy_folders, tiny,
                                                                                             monkeypatch):
    """One micro-batch per step: the parameters' gradients are the graph's output tensors, not copies made each
    step, and the training is bit for bit that of copying them."""
    from eridiffusion.trainers import loop
    from eridiffusion.trainers.comfy_compat import training_mode
    p = prepared(comfy_folders, tiny, arch="sdxl", sizes=SIZES)
    one = dict(compile="cuda_graphs", grad_accumulation=1)
    adopted = train_node(p, 8, **one)
    monkeypatch.setattr(loop, "ADOPT_GRADIENTS", False)
    copied = train_node(p, 8, **one)
    assert adopted.history.losses == copied.history.losses
    assert all(torch.equal(adopted.weights[k], copied.weights[k]) for k in copied.weights)
    monkeypatch.setattr(loop, "ADOPT_GRADIENTS", True)
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        run = loop.TrainingRun(p["model"], p["adapter"], p["latents"], p["captions"],
                               settings(**{**OPTIONS, **one}), end_step=8)
        for _ in range(8):
            run.step()
        replayed = [entry[2][1] for entry in run.micro_batches.graphs.values() if entry is not None]
        assert replayed and any(all(param.grad is gradient for param, gradient in zip(run.params, gradients))
                                for gradients in replayed)


@pytest.mark.parametrize("optimizer, accumulation", [("adamw", 1), ("adamw", 2), ("adamw8bit", 1), ("prodigy", 1)])
def test_steps_queued_ahead_train_bit_for_bit_as_one_step_at_a_time(comfy_folders, tiny, captures, optimizer,
                                                                     accumulation):
    """train() replays the next step's graph before it reads a step's loss (TrainingRun.step's `ahead`): the
    device runs it after the optimizer step, so nothing changes."""
    from eridiffusion.trainers import loop
    from eridiffusion.trainers.comfy_compat import training_mode
    pytest.importorskip({"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(optimizer, "torch"))
    p = prepared(comfy_folders, tiny, arch="sdxl", sizes=SIZES)
    options = dict(compile="cuda_graphs", optimizer=optimizer, grad_accumulation=accumulation)
    queued = train_node(p, 8, **options)
    with torch.inference_mode(False), torch.enable_grad(), training_mode():
        run = loop.TrainingRun(p["model"], p["adapter"], p["latents"], p["captions"],
                               settings(**{**OPTIONS, **options}), end_step=8)
        for _ in range(8):
            run.step()
        one_at_a_time = run.export()
    assert captures and all(captures)
    assert queued.history.losses == one_at_a_time.history.losses
    assert all(torch.equal(queued.weights[k], one_at_a_time.weights[k]) for k in queued.weights)


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux"])
def test_preparing_a_micro_batch_never_waits_for_the_gpu(comfy_folders, tiny, monkeypatch, arch):
    """The host draws the next step's batch and copies it to the GPU while the GPU still runs the step before
    (TrainingRun.step's `ahead`): a copy that synchronizes would make the GPU wait for the host again."""
    from eridiffusion.trainers import loop
    original = loop.TrainingRun._micro_batch

    def never_syncing(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")       # a synchronizing call raises
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(loop.TrainingRun, "_micro_batch", never_syncing)
    p = prepared(comfy_folders, tiny, arch=arch, sizes=SIZES)
    assert train_node(p, 4, compile="cuda_graphs").step == 4


def test_graphs_are_captured_again_after_other_models_were_loaded_in_between(comfy_folders, tiny, captures):
    import comfy.model_management
    p = prepared(comfy_folders, tiny, arch="sdxl")     # one bucket: captured in step 2 of every 3
    eager = train_node(p, 12, compile="off", on_every=lambda run: None)

    def unload_everything(run):        # what sampling with another model can do: the weights move away and back
        comfy.model_management.unload_all_models()
        torch.cuda.empty_cache()
    graphed = train_node(p, 12, compile="cuda_graphs", on_every=unload_everything)
    assert len(captures) == 4 and all(captures)
    assert_same_training(graphed, eager)
