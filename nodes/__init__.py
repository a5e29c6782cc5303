"""The pack's nodes: one file per feature area, each a list NODES."""
from comfy_api.latest import ComfyExtension

from . import adapter, dataset, job, sample, train

ALL_NODES = [*dataset.NODES, *adapter.NODES, *train.NODES, *sample.NODES, *job.NODES]


class EriDiffusionExtension(ComfyExtension):
    async def get_node_list(self):
        return list(ALL_NODES)
