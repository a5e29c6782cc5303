"""Adapter methods by name. Each module defines its layer class; base.Method gives every one the same
build_layers / layer_weights / to_file_tensors / from_file_tensors; nodes fill their combo from ADAPTERS. DoRA is not a method of its own:
AdapterSpec.dora adds a weight-decomposed magnitude to any of them (see base.py)."""
from ..config import quoted
from .base import Method
from .loha import LohaLayer
from .lokr import LokrLayer
from .lora import LoraLayer

ADAPTERS = {"lora": Method(LoraLayer), "lokr": Method(LokrLayer), "loha": Method(LohaLayer)}


def method(kind: str):
    try:
        return ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"adapter type {quoted(kind)} is not available; choose one of {', '.join(ADAPTERS)}") from None
