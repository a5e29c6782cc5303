"""Adapter methods by name. Each module offers build_layers / layer_weights / to_file_tensors /
from_file_tensors for its method; nodes fill their combo from ADAPTERS. DoRA is not a method of its own:
AdapterSpec.dora adds a weight-decomposed magnitude to any of them (see base.py)."""
from . import loha, lokr, lora

ADAPTERS = {"lora": lora, "lokr": lokr, "loha": loha}


def method(kind: str):
    try:
        return ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"adapter type {kind!r} is not available; choose one of {', '.join(ADAPTERS)}") from None
