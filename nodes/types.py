"""The pack's custom socket types. Each carries a frozen object from `trainers/`, never a raw dict."""
from comfy_api.latest import io

CATEGORY = "EriDiffusion"

Dataset = io.Custom("ERI_DATASET")        # trainers.data.Dataset
Latents = io.Custom("ERI_LATENTS")        # trainers.cache.LatentSet
Text = io.Custom("ERI_TEXT")              # trainers.cache.TextSet
Adapter = io.Custom("ERI_ADAPTER")        # trainers.state.AdapterState
Settings = io.Custom("ERI_SETTINGS")      # trainers.config.TrainingSettings
Loss = io.Custom("ERI_LOSS")              # trainers.state.LossHistory
Sampling = io.Custom("ERI_SAMPLING")      # trainers.sampling.SamplingSettings
