"""The optimizers: one entry each, holding everything the settings, the form, the estimate, the loop and the LoRA
files know of it. Adding an optimizer is one entry here (and a resume test in tests/test_optimizers.py).

No torch here at import (nor bitsandbytes, prodigyopt, ...): the app reads the registry without them, and each
class is imported when a run builds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_gui.errors import ConfigError, check_between

if TYPE_CHECKING:
    import torch

    from lora_gui.config import TrainConfig

STEADY_SCHEDULERS = ("constant", "constant_with_warmup")  # the learning rate never decays


def _positive_rate(name: str, value: float) -> None:
    check_between(name, value, 0.0, 1.0)
    if value <= 0:
        raise ConfigError(f"{name} must be above 0; 1e-4 is a good start")
    if value > 0.01:
        raise ConfigError(
            f"{name} {value:g} is far too high for LoRA and would wreck the model; try 1e-4 "
            "(only the prodigy optimizer takes 1.0)"
        )


def _prodigy_rate(name: str, value: float) -> None:
    """Prodigy finds its own step size: its learning rate only scales it, and 1.0 is what its authors advise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 0.1:
        raise ConfigError(
            f"{name} {value:g} is an AdamW learning rate: Prodigy finds its own step size, so its learning rate is "
            "a multiplier; use 1.0"
        )
    check_between(name, value, 0.1, 10.0)


def _adam_settings(config: TrainConfig) -> dict[str, Any]:
    return {
        "weight_decay": config.adam_weight_decay,
        "betas": (config.adam_beta1, config.adam_beta2),
        "eps": config.adam_epsilon,
    }


def _prodigy_settings(config: TrainConfig) -> dict[str, Any]:
    # As Prodigy's README advises for diffusion models: Adam's bias correction, and with a warmup its step size
    # estimated without the learning rate, which the warmup's ramp from zero would hold back.
    warmup = config.lr_warmup_steps > 0
    return {
        **_adam_settings(config),
        "d_coef": config.prodigy_d_coef,
        "use_bias_correction": True,
        "safeguard_warmup": warmup,
    }


def _adafactor_settings(config: TrainConfig) -> dict[str, Any]:
    # The learning rate as given, not Adafactor's own step sizes relative to each weight's size; no first moment
    # (beta1 stays None), which is what makes it small. Its eps is a pair of its own, left as it is.
    return {"weight_decay": config.adam_weight_decay, "relative_step": False, "scale_parameter": False}


def _torch_adamw() -> type:
    import torch

    return torch.optim.AdamW


def _adamw8bit() -> type:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "8-bit AdamW needs the bitsandbytes package: run `pip install bitsandbytes` (NVIDIA GPUs only), "
            "or choose the adamw optimizer"
        ) from None
    return bnb.optim.AdamW8bit


def _prodigy() -> type:
    from prodigyopt import Prodigy

    return Prodigy


def _adamw_schedulefree() -> type:
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree


def _adafactor() -> type:
    from transformers.optimization import Adafactor

    return Adafactor


def _as_trained(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


@contextlib.contextmanager
def _at_averaged_weights(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Schedule-free AdamW takes its gradients at other weights than those to use: it keeps an average to use,
    which `eval()` moves the weights to. Back to training, the training weights are put back bit for bit, not
    worked out again from the average (which rounds): so however often a run evaluates, what it learns is the
    same, and a run stopped and resumed learns what one uninterrupted run does. Its checkpoints are saved
    training, so they hold those weights exactly."""
    import torch

    training = [param.detach().clone() for param in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, kept in zip(params, training, strict=True):
                param.copy_(kept)


_ADAM_RATE = "How big each update is; 1e-4 is a safe start for LoRA."


@dataclass(frozen=True)
class Optimizer:
    """What the settings, the form, the estimate, the loop and the LoRA files know of an optimizer."""

    title: str  # its name in sentences
    summary: str  # what it is for, in the optimizer setting's help
    learning_rate: float  # its usual learning rate: the form's, when the one set is another optimizer's
    state_bytes: int  # its state per trained parameter (the LoRA's weights are fp32)
    kohya_class: str  # how kohya names its class in ss_optimizer
    load: Callable[[], type]  # its class, imported when a run builds it
    rate_help: str = _ADAM_RATE  # the learning rate's hint under it
    check_rate: Callable[[str, Any], None] = _positive_rate  # refuses a learning rate it can't take, in words
    # Its own settings, from the run's (a LoRA's metadata names them). Each is also a key of its parameter groups,
    # which a checkpoint brings back as saved: that is how a resume sets those it may change.
    settings: Callable[[TrainConfig], dict[str, Any]] = _adam_settings
    speedups: Mapping[str, Any] = field(default_factory=dict)  # construction options that change nothing learned
    decays: bool = True  # whether it takes a decaying learning-rate schedule
    one_rate: bool = False  # whether it takes one learning rate for every parameter group
    # The LoRA's weights as they are to be used, around anything that evaluates or saves the LoRA (previews, the
    # validation loss, the LoRA files): the weights it trains, unless it evaluates at others.
    evaluating: Callable[[Any, list], AbstractContextManager[None]] = _as_trained


OPTIMIZERS = {
    "adamw": Optimizer(
        "AdamW",
        "the usual",
        1e-4,
        8,  # both moments in fp32
        "torch.optim.adamw.AdamW",
        _torch_adamw,
        # The fused kernel updates every tensor in one pass, on a GPU and on a CPU alike: on the tiny model's
        # CPU step it takes half the time of the foreach one (0.40 against 0.87 ms, gradient clipping included).
        speedups={"fused": True},
    ),
    "adamw8bit": Optimizer(
        "8-bit AdamW",
        "less memory; NVIDIA GPUs",
        1e-4,
        2,  # both moments in 8 bits
        "bitsandbytes.optim.adamw.AdamW8bit",
        _adamw8bit,
    ),
    "prodigy": Optimizer(
        "Prodigy",
        "finds its own step size: learning rate 1.0",
        1.0,
        # Adam's two moments, its running sum of gradients `s` and the starting weights `p0` (a single zero for a
        # lora_B that starts at zero: about 14 bytes in all, counted as 16 to stay on the safe side).
        16,
        "prodigyopt.prodigy.Prodigy",
        _prodigy,
        rate_help="Prodigy finds its own step size and this only scales it: leave it at 1.0 (0.5 gentler).",
        check_rate=_prodigy_rate,
        settings=_prodigy_settings,
        one_rate=True,  # prodigyopt finds one step size for every parameter group, and refuses groups with others
    ),
    "adamw-schedulefree": Optimizer(
        "schedule-free AdamW",
        "no schedule needed",
        1e-4,
        8,  # the second moment and the averaged weights' other sequence `z`
        "schedulefree.adamw_schedulefree.AdamWScheduleFree",
        _adamw_schedulefree,
        rate_help=_ADAM_RATE + " Schedule-free AdamW keeps it constant: its averaging does what a decay would.",
        decays=False,  # its averaging does that work
        evaluating=_at_averaged_weights,
    ),
    "adafactor": Optimizer(
        "Adafactor",
        "least memory",
        1e-4,
        # No first moment, and the second one factored into a row and a column per matrix (every LoRA weight is
        # one): rank + width numbers for rank x width weights, counted as none.
        0,
        "transformers.optimization.Adafactor",
        _adafactor,
        settings=_adafactor_settings,
    ),
}
SETTING_HELP = "; ".join(f"{name} ({optimizer.summary})" for name, optimizer in OPTIMIZERS.items()) + "."


def build(param_groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over `param_groups`, with its settings."""
    optimizer = OPTIMIZERS[config.optimizer]
    return optimizer.load()(param_groups, **optimizer.settings(config), **optimizer.speedups)


def check_rates(config: TrainConfig) -> None:
    """Raise ConfigError if the learning rates are none the optimizer takes (an unknown optimizer's are checked as
    AdamW's: its name is refused with the other choices)."""
    optimizer = OPTIMIZERS.get(config.optimizer, OPTIMIZERS["adamw"])
    optimizer.check_rate("learning_rate", config.learning_rate)
    if config.text_encoder_learning_rate:
        optimizer.check_rate("text_encoder_learning_rate", config.text_encoder_learning_rate)
    if optimizer.one_rate and config.text_encoder_learning_rate not in (0, config.learning_rate):
        raise ConfigError(
            f"{optimizer.title} takes one learning rate for everything it trains: set text_encoder_learning_rate to 0 "
            "(the same as learning_rate)"
        )


def check_schedule(config: TrainConfig) -> None:
    """Raise ConfigError if the schedule decays under an optimizer that does without."""
    if not OPTIMIZERS[config.optimizer].decays and config.lr_scheduler not in STEADY_SCHEDULERS:
        raise ConfigError(
            f"lr_scheduler {config.lr_scheduler} lowers the learning rate over the run, which the "
            f"{config.optimizer} optimizer does without: its averaging of the weights does that work. "
            "Pick constant, or constant_with_warmup for a warmup"
        )


def settings_for_optimizer(
    optimizer: str, learning_rate: Any, text_encoder_learning_rate: Any, lr_scheduler: str, lr_warmup_steps: Any
) -> dict[str, Any]:
    """For a form where `optimizer` was just picked: which of these settings must change for it to be valid, and
    to what. A learning rate made for another optimizer (AdamW's 1e-4 under Prodigy, Prodigy's 1.0 under AdamW)
    becomes this one's usual, a text encoder's rate that no longer fits becomes 0 (the same), and a decaying
    schedule under schedule-free AdamW a constant one, its warmup kept. A rate that fits is the user's: kept."""
    picked = OPTIMIZERS[optimizer]
    changes: dict[str, Any] = {}
    if not _passes(picked.check_rate, learning_rate):
        changes["learning_rate"] = picked.learning_rate
    rate = changes.get("learning_rate", learning_rate)
    encoder_rate = text_encoder_learning_rate
    if encoder_rate and (not _passes(picked.check_rate, encoder_rate) or (picked.one_rate and encoder_rate != rate)):
        changes["text_encoder_learning_rate"] = 0.0
    if not picked.decays and lr_scheduler not in STEADY_SCHEDULERS:
        changes["lr_scheduler"] = "constant_with_warmup" if lr_warmup_steps else "constant"
    return changes


def _passes(check: Callable[[str, Any], None], value: Any) -> bool:
    try:
        check("learning_rate", value)
    except ConfigError:
        return False
    return True
