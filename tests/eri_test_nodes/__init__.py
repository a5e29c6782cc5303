"""Test-only node pack: hands ComfyUI tiny models built in-process with ComfyUI's own classes.

ComfyUI's loaders detect a tiny SD3 from a file but not a tiny SDXL or Flux (their detection matches only
full-size shapes), so the live-server tests and the demo get their MODEL / CLIP / VAE from this node.
It is linked into a server's custom_nodes only by the tests and the demo, never installed for users.
"""
from comfy_api.latest import ComfyExtension, io

from . import tiny_models


class EriTestTinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EriTestTinyModel", display_name="Tiny model (tests)", category="EriDiffusion/testing",
            description="A tiny randomly initialised model of the chosen architecture, for tests and the demo.",
            inputs=[
                io.Combo.Input("arch", options=list(tiny_models.ARCHITECTURES), default="sdxl",
                               tooltip="Architecture of the tiny model."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.Vae.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, arch, seed) -> io.NodeOutput:
        import torch
        with torch.inference_mode(False):
            return io.NodeOutput(tiny_models.tiny_model(arch, seed), tiny_models.tiny_clip(arch, seed),
                                 tiny_models.tiny_vae(arch, seed))


class TestNodes(ComfyExtension):
    async def get_node_list(self):
        return [EriTestTinyModel]


async def comfy_entrypoint():
    return TestNodes()
