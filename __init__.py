"""EriDiffusion for ComfyUI: train LoRA adapters for SDXL, SD 3.5 and Flux on the models ComfyUI loaded.

Registered through ComfyUI's V3 API; no logic lives here.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import EriDiffusionExtension
    return EriDiffusionExtension()
