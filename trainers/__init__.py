"""The training engine. Knows ComfyUI's model classes but nothing of its server; `nodes/` adapts it."""
