"""Per-prompt sample settings: `a photo of ohwx --w 768 --h 1024 --d 7 --l 4.5 --s 30 --n blurry`.

The flags are sd-scripts' (--n negative, --w width, --h height, --d seed, --l CFG scale, --s steps), with the
long names ai-toolkit accepts as well (--seed, --cfg, --steps) and --g for Flux's embedded guidance. The
same options come from ai-toolkit's `sample.samples[]` items. Every value is bounded as the Sampling
settings node's inputs are. Nothing here imports ComfyUI (the YAML reader uses it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ConfigError, check_finite, quoted

SIZE_MIN, SIZE_MAX = 64, 8192      # the node's width / height bounds
STEPS_MAX = 1000
SEED_MAX = 0xFFFFFFFF
SCALE_MAX = 100.0                  # CFG and guidance, as the node's inputs

# flag -> (field, type)
FLAGS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
         "seed": ("seed", int), "l": ("cfg", float), "cfg": ("cfg", float), "s": ("steps", int),
         "steps": ("steps", int), "g": ("guidance", float)}
# ai-toolkit's flags for what EriDiffusion does not do (network multiplier, second-encoder prompts, guidance
# rescale, adapter scale): a YAML job names them in its ignored-keys warning.
AITK_UNSUPPORTED_FLAGS = ("m", "network_multiplier", "p2", "n2", "gr", "a")
# a flag starts a word: "--" inside a word or followed by a non-letter stays prompt text
_FLAG = re.compile(r"(?:^|\s)--([a-z_0-9]+)(?=\s|$)")


@dataclass(frozen=True)
class PromptOptions:
    """What one prompt changes of its round's settings; None keeps the round's. `negative` is text where it
    was parsed, and its CONDITIONING once Sampling settings encoded it."""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    guidance: float | None = None
    negative: object = None

    def __post_init__(self):
        check_finite("prompt options", cfg=self.cfg, guidance=self.guidance)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value % 8 or not SIZE_MIN <= value <= SIZE_MAX):
                raise ConfigError(f"{name} must be a multiple of 8 between {SIZE_MIN} and {SIZE_MAX}, got {value}")
        if self.steps is not None and not 1 <= self.steps <= STEPS_MAX:
            raise ConfigError(f"steps must be between 1 and {STEPS_MAX}, got {self.steps}")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"seed must be between 0 and {SEED_MAX}, got {self.seed}")
        for name in ("cfg", "guidance"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= SCALE_MAX:
                raise ConfigError(f"{name} must be between 0 and {SCALE_MAX:g}, got {value}")


def rounded_size(value: int) -> int:
    """ai-toolkit rounds a sample's width and height down to a multiple of 8 (at least 64)."""
    return max(SIZE_MIN, value - value % 8)


def parse_prompt(line: str, unsupported=()) -> tuple[str, PromptOptions, tuple[str, ...]]:
    """(prompt text, its options, the flags of `unsupported` it set, as "--m 0.5"). Any other unknown flag or a
    value that does not fit is a ConfigError naming the flag."""
    parts = _FLAG.split(line)
    text, values, skipped = parts[0].strip(), {}, []
    for flag, content in zip(parts[1::2], parts[2::2]):
        content = content.strip()
        if flag in unsupported:
            skipped.append(f"--{flag} {content}".strip())
            continue
        if flag not in FLAGS:
            raise ConfigError(f"unknown prompt flag {quoted('--' + flag)}; the flags are --n (negative prompt), "
                              f"--w, --h (size), --d (seed), --l (CFG), --s (steps), --g (Flux guidance)")
        name, kind = FLAGS[flag]
        try:
            values[name] = content if kind is str else kind(content)
        except ValueError:
            raise ConfigError(f"prompt flag --{flag} needs {'a whole number' if kind is int else 'a number'}, got "
                              f"{quoted(content)}") from None
        if name in ("width", "height"):
            values[name] = rounded_size(values[name]) if values[name] >= SIZE_MIN else values[name]
    return text, PromptOptions(**values), tuple(skipped)
