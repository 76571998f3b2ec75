"""TrainConfig: every training knob, its default, its help text and its validation, in one place.

The command line's flags, the app's hints and the preset files are all generated from the field
metadata below, so a knob is documented exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.adapter_kinds import ADAPTER_KINDS
from lora_gui.atomic import write_text_atomic
from lora_gui.errors import ConfigError, check_between
from lora_gui.families import REGISTRY
from lora_gui.optimizers import OPTIMIZERS, SETTING_HELP, check_rates, check_schedule
from lora_gui.quantization import QUANTIZATIONS

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
FAMILIES = ("auto", *REGISTRY)
_PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LORA_TYPES = tuple(ADAPTER_KINDS)
# Settings a resumed run may change: they leave what was learned as it is (the learning rate after a divergence,
# the length of the run, when to save and sample). The others stay as the run started.
CHANGEABLE_ON_RESUME = (
    "max_steps",
    "epochs",
    "learning_rate",
    "text_encoder_learning_rate",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "prodigy_d_coef",
    "gradient_checkpointing",
    "validation_every",
    "keep_best",
    "early_stop",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_prompts",
    "sample_every",
    "sample_steps",
    "sample_seed",
    "log_every",
)


def _field(default: Any, help: str, group: str = "advanced", **kwargs: Any) -> Any:
    """A dataclass field whose help text and UI group travel with it."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "group": group, **kwargs})
    return field(default=default, metadata={"help": help, "group": group, **kwargs})


@dataclass
class TrainConfig:
    # What to train on.
    base_model: str = _field(
        "", "Base model: a Hugging Face Hub id, a diffusers folder or a single .safetensors checkpoint.", "model"
    )
    family: str = _field(
        "auto",
        "Which kind of model the base model is; auto reads it from the model. Set it only when the page asks you to "
        "(a model not downloaded yet, so the estimate can be made).",
        choices=FAMILIES,
    )
    data: str = _field(
        "",
        "Training images: a folder (captions in same-name .txt files or metadata.jsonl/.csv) "
        "or a Hugging Face dataset name.",
        "data",
    )
    image_column: str = _field(
        "",
        "Hugging Face datasets only: which column holds the pictures (empty: found by itself).",
    )
    caption_column: str = _field(
        "",
        "Hugging Face datasets only: which column holds the captions (empty: found by itself).",
    )
    control_data: str = _field(
        "",
        'Edit LoRAs only (an editing model such as Flux.1 Kontext): a folder of the "before" pictures, each named '
        'as its "after" picture in the training images (any picture format); the caption says the edit.',
        "data",
    )
    control_column: str = _field(
        "",
        'Edit LoRAs from Hugging Face datasets only: which column holds the "before" pictures (empty: found by '
        "itself, such as control_image).",
    )
    default_caption: str = _field(
        "",
        "The caption of pictures that have none; leave it empty to leave such pictures out.",
        "data",
    )
    trigger_word: str = _field(
        "",
        "A made-up word (such as ohwx) put in front of every caption. Use it in your prompts afterwards to call "
        "up what the LoRA learned; leave it empty if your captions already share such a word.",
        "data",
    )
    caption_dropout: float = _field(
        0.0,
        "How often a picture is shown without its caption (0 to 0.5), so the LoRA also shows up with short "
        "prompts. 0.05 is a good start for a person or object, 0.1 for a style.",
    )

    # Images.
    resolution: int = _field(
        512,
        "The size pictures are trained at, in pixels: best the size the model was made for ("
        + ", ".join(f"{family.short_title}: {family.default_resolution}" for family in REGISTRY.values())
        + "; the demo model: 64), which picking a base model sets. Smaller trains faster but less sharp.",
        "main",
    )
    aspect_buckets: bool = _field(
        True,
        "Keep each picture's shape by training similar shapes together. Off: every picture is cut to a square from "
        "its middle.",
    )
    random_flip: bool = _field(
        False,
        "Also train on mirror images of the pictures: more variety for objects and styles. Leave it off for faces, "
        "text or logos, which look wrong mirrored.",
    )

    # How long and how hard.
    max_steps: int = _field(
        1000,
        "How long to train: each step learns from one batch of pictures. More steps learn more, but too many copy "
        "the pictures; about 100 looks at each picture is usual.",
        "main",
    )
    epochs: int = _field(
        0,
        "Instead of Steps: how many times to go through all your pictures (0: use Steps).",
    )
    batch_size: int = _field(
        1,
        "Pictures learned from at once. Higher is faster per picture and smoother, but needs more GPU memory.",
    )
    gradient_accumulation_steps: int = _field(
        1,
        "Learn from this many batches before each update: a larger batch without more memory, at the cost of "
        "time. Leave it at 1 unless a guide says otherwise.",
    )
    learning_rate: float = _field(1e-4, OPTIMIZERS["adamw"].rate_help, "main")
    text_encoder_learning_rate: float = _field(
        0.0,
        "Learning rate of the part that reads prompts, when it is trained too (0: the same as the learning rate).",
    )
    lr_scheduler: str = _field(
        "constant",
        "How the learning rate changes during training: constant keeps it; the others lower it towards the end. "
        "constant is fine for most LoRAs.",
        choices=LR_SCHEDULERS,
    )
    lr_warmup_steps: int = _field(
        0,
        "Steps at the start over which the learning rate rises from zero, for a gentler start (needs a schedule "
        "other than constant).",
    )
    optimizer: str = _field(
        "adamw",
        SETTING_HELP + " How the LoRA is updated at each step: leave it at adamw unless the GPU is short of memory "
        "(adamw8bit) or a guide says otherwise.",
        choices=tuple(OPTIMIZERS),
    )
    prodigy_d_coef: float = _field(
        1.0,
        "Prodigy only: how bold the step size it finds is (0.5 gentler, 2 bolder); leave it at 1.",
    )
    adam_beta1: float = _field(
        0.9,
        "How much each update follows the previous ones (momentum, 0 to 0.9999). Leave it at 0.9.",
    )
    adam_beta2: float = _field(
        0.999,
        "How slowly AdamW adapts to the size of recent updates (0 to 0.99999). Leave it at 0.999.",
    )
    adam_weight_decay: float = _field(
        1e-2,
        "Pulls the LoRA's weights gently towards zero so it does not overdo what it learned. Leave it at 0.01.",
    )
    adam_epsilon: float = _field(
        1e-8,
        "A tiny number that keeps AdamW's updates from dividing by zero. Leave it at 1e-8.",
    )
    max_grad_norm: float = _field(
        1.0,
        "Limits how big one update may be, so one odd picture can't wreck the LoRA (0: no limit). Leave it at 1.",
    )

    # The LoRA itself.
    rank: int = _field(
        16,
        "How much the LoRA can learn, and how big its file is: 4-8 for a style, 16-32 for a person. Higher "
        "learns more detail but takes longer and may copy the pictures.",
        "main",
    )
    lora_type: str = _field(
        "lora",
        "Which kind of LoRA: lora is the usual one and loads everywhere; "
        + ", ".join(name for name in ADAPTER_KINDS if name != "lora")
        + " can learn more for the same file size, but fewer programs load them. Leave it at lora if unsure.",
        choices=LORA_TYPES,
    )
    alpha: float = _field(
        0.0,
        "Scales how strongly the LoRA changes the model (0: the same as the rank). Leave it at 0 unless a guide "
        "gives a value.",
    )
    target_modules: list[str] = _field(
        [],
        "Which parts of the model get a LoRA (empty: the usual ones for this kind of model). Change it only "
        "when a guide tells you to.",
    )
    train_text_encoder: bool = _field(
        False,
        "Also teach the part that reads prompts, so a new word (the trigger word) is understood better. Uses more "
        "memory; the demo turns it on.",
    )
    text_encoder_target_modules: list[str] = _field(
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        "Which parts of the prompt reader get a LoRA when it is trained too. Leave it as it is.",
    )

    # Noise and loss.
    snr_gamma: float = _field(
        0.0,
        "Balances the easy and the hard noise levels training learns from (5 is usual, 0: off). It can make a "
        "LoRA learn faster; leave it at 0 if unsure.",
    )
    noise_offset: float = _field(
        0.0,
        "Helps a LoRA draw very dark or very bright pictures (0.05 to 0.1; 0: off). Leave it at 0 otherwise.",
    )

    # Validation: a loss on pictures never trained on, at fixed noise and timesteps, so its curve moves only
    # because the LoRA changed.
    validation_images: int = _field(
        0,
        "Pictures kept out of training to check how well the LoRA does on pictures it never saw (0: none; 2-4 is "
        "plenty). Needs 8 pictures or more.",
    )
    validation_data: str = _field(
        "",
        "A folder of pictures with captions to check the LoRA on, instead of keeping some of yours out.",
    )
    validation_every: int = _field(
        100,
        "How often, in steps, to check the LoRA on the kept-out pictures.",
    )
    keep_best: bool = _field(
        True,
        "Also keep the LoRA from the step that did best on the kept-out pictures (<name>-best.safetensors).",
    )
    early_stop: int = _field(
        0,
        "Stop when the check on kept-out pictures has not improved this many times in a row (0: never).",
    )

    # Speed and memory.
    mixed_precision: str = _field(
        "auto",
        "How precisely the numbers are computed. auto picks the fastest this GPU does well (full precision on a "
        "processor); change it only if training fails with a message about it.",
        choices=MIXED_PRECISIONS,
    )
    gradient_checkpointing: bool = _field(
        False,
        "Needs much less GPU memory but trains about 30% slower. Turn it on when the estimate says the GPU is "
        "too small.",
    )
    quantize_base: str = _field(
        "none",
        "Store the base model, which does not change, in fewer bits so it fits a smaller GPU; the LoRA still "
        "learns at full precision. int8 halves its memory (any computer), nf4 quarters it (NVIDIA GPUs only); none "
        "keeps it exact.",
        choices=tuple(QUANTIZATIONS),
    )
    blocks_to_swap: int = _field(
        0,
        "Keep this many of the base model's blocks in the computer's memory, each brought to the GPU only while it "
        "is used: the largest models (Qwen-Image, Flux.2 dev) then fit a 16-24 GB GPU, at a cost in speed that the "
        "estimate shows. 0 keeps the whole model on the GPU, the fastest.",
    )
    channels_last: bool = _field(
        False,
        "Another memory layout that can be a little faster on NVIDIA GPUs. Leave it off unless you test it.",
    )
    torch_compile: bool = _field(
        False,
        "Prepare the model for this computer first: a slow first step (up to a minute), then faster ones; needs a "
        "C++ compiler or, on a GPU, Triton. Worth it for long runs only.",
    )
    seed: int = _field(
        42,
        "The starting point of everything random: the same number and settings give the same LoRA.",
    )

    # Saving and previews.
    checkpoint_every: int = _field(
        250,
        "Save a point to resume from every this many steps (0: only at the end).",
    )
    keep_checkpoints: int = _field(
        3,
        "How many of those resume points to keep on disk (older ones are deleted).",
    )
    sample_prompts: list[str] = _field(
        [],
        "Prompts for the preview pictures (empty: the first picture's caption).",
    )
    sample_every: int = _field(
        250,
        "Make preview pictures every this many steps, to watch the LoRA learn (0: only at the end).",
    )
    sample_steps: int = _field(
        20,
        "How carefully each preview is drawn: more is slower and a little sharper. 20 is plenty.",
    )
    sample_seed: int = _field(
        1234,
        "Keeps the previews drawn from the same start, so they can be compared over the run.",
    )
    log_every: int = _field(
        1,
        "How often, in steps, to write a line of the loss and speed to the run's log.",
    )

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first setting that makes no sense, in plain words."""
        check_between("resolution", self.resolution, 64, 4096)
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (got {self.resolution}); try 512, 768 or 1024")
        check_between("max_steps", self.max_steps, 1, 10_000_000)
        check_between("epochs", self.epochs, 0, 100_000)
        check_between("batch_size", self.batch_size, 1, 1024)
        check_between("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 1024)
        check_rates(self)
        self._check_optimizer_numbers()
        self._check_other_numbers()
        if self.validation_images and self.validation_data:
            raise ConfigError("pick one way to validate: validation_images (held out) or validation_data (a folder)")
        self._check_choices()
        if self.train_text_encoder and not self.text_encoder_target_modules:
            raise ConfigError("text_encoder_target_modules must name at least one layer when training the text encoder")
        if not ADAPTER_KINDS[self.lora_type].trains_on_nf4 and self.quantize_base == "nf4":
            raise ConfigError(
                f"lora_type {self.lora_type} can't train on a base stored in NF4: pick quantize_base int8 or none, "
                f"or lora_type {' or '.join(name for name, kind in ADAPTER_KINDS.items() if kind.trains_on_nf4)}"
            )
        check_schedule(self)
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ConfigError(
                "lr_warmup_steps needs a scheduler with warmup: pick constant_with_warmup, linear or cosine"
            )

    def _check_optimizer_numbers(self) -> None:
        check_between("prodigy_d_coef", self.prodigy_d_coef, 0.01, 100.0)
        check_between("lr_warmup_steps", self.lr_warmup_steps, 0, 10_000_000)
        check_between("adam_beta1", self.adam_beta1, 0.0, 0.9999)
        check_between("adam_beta2", self.adam_beta2, 0.0, 0.99999)
        check_between("adam_weight_decay", self.adam_weight_decay, 0.0, 10.0)
        check_between("adam_epsilon", self.adam_epsilon, 0.0, 1.0)
        if self.adam_epsilon <= 0:
            # A weight whose gradient is still zero gets 0 / 0 from AdamW: NaN, and the LoRA is lost.
            raise ConfigError("adam_epsilon must be above 0 (1e-8 is usual): at 0 the LoRA's weights become NaN")
        check_between("max_grad_norm", self.max_grad_norm, 0.0, 1e6)

    def _check_other_numbers(self) -> None:
        check_between("rank", self.rank, 1, 256)
        check_between("alpha", self.alpha, 0.0, 4096.0)
        check_between("caption_dropout", self.caption_dropout, 0.0, 0.5)
        check_between("snr_gamma", self.snr_gamma, 0.0, 100.0)
        check_between("noise_offset", self.noise_offset, 0.0, 1.0)
        check_between("seed", self.seed, 0, 2**32 - 1)
        check_between("checkpoint_every", self.checkpoint_every, 0, 10_000_000)
        check_between("keep_checkpoints", self.keep_checkpoints, 1, 1000)
        check_between("sample_every", self.sample_every, 0, 10_000_000)
        check_between("sample_steps", self.sample_steps, 1, 200)
        check_between("sample_seed", self.sample_seed, 0, 2**32 - 1)
        check_between("log_every", self.log_every, 1, 100_000)
        check_between("validation_images", self.validation_images, 0, 1000)
        check_between("validation_every", self.validation_every, 1, 10_000_000)
        check_between("early_stop", self.early_stop, 0, 10_000)
        check_between("blocks_to_swap", self.blocks_to_swap, 0, 1000)

    def _check_choices(self) -> None:
        for name, choices in (
            ("lr_scheduler", LR_SCHEDULERS),
            ("mixed_precision", MIXED_PRECISIONS),
            ("family", FAMILIES),
            ("optimizer", tuple(OPTIMIZERS)),
            ("lora_type", LORA_TYPES),
            ("quantize_base", tuple(QUANTIZATIONS)),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)} (got {getattr(self, name)!r})")

    # ---- derived values -----------------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return self.alpha or float(self.rank)

    def total_steps(self, batches_per_epoch: int, num_processes: int = 1) -> int:
        """Optimizer steps of the whole run: max_steps, or enough steps to cover `epochs` passes."""
        if not self.epochs:
            return self.max_steps
        batches_per_step = self.gradient_accumulation_steps * num_processes
        return max(1, math.ceil(batches_per_epoch * self.epochs / batches_per_step))

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "settings") -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known) - {"description"})
        if unknown:
            raise ConfigError(f"{source} has unknown setting(s): {', '.join(unknown)}")
        cleaned = {}
        for name, value in values.items():
            if name == "description":
                continue
            cleaned[name] = _coerce(name, value, known[name].default, known[name].default_factory)
        return cls(**cleaned)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | os.PathLike, description: str = "") -> None:
        values = self.to_dict()
        if description:
            values = {"description": description, **values}
        write_text_atomic(Path(path), json.dumps(values, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"settings file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path.name} is not valid JSON ({error.msg} on line {error.lineno})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path.name} must hold a JSON object of settings")
        return cls.from_dict(values, source=path.name)

    @staticmethod
    def help(name: str) -> str:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}[name]


def _coerce(name: str, value: Any, default: Any, default_factory: Any) -> Any:
    """Turn JSON or command-line values into the field's type, with an error that names the field."""
    if default is dataclasses.MISSING:
        default = default_factory()
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            return [str(item) for item in value]
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "a whole number", float: "a number", list: "a list"}.get(
            type(default), "text"
        )
        raise ConfigError(f"{name} must be {kind} (got {value!r})") from None


# ---- presets --------------------------------------------------------------------------------
def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description."""
    presets = {}
    for path in sorted(PRESETS_DIR.glob("*.json")):
        presets[path.stem] = json.loads(path.read_text(encoding="utf-8")).get("description", "")
    return presets


def save_preset(name: str, config: TrainConfig, description: str = "") -> Path:
    """Save settings as a new preset; never overwrites one, so the shipped presets stay as they are."""
    name = check_preset_name(name)
    path = PRESETS_DIR / f"{name}.json"
    if path.exists():
        raise ConfigError(f"a preset named {name!r} already exists; pick another name")
    config = as_preset(config)
    config.save(path, description=description or f"Saved from the app: rank {config.rank}, {config.max_steps} steps.")
    return path


def check_preset_name(name: str) -> str:
    """The name, stripped, if a preset may have it; a ConfigError saying how to fix it if not."""
    name = name.strip()
    if not _PRESET_NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} can't be a preset name: use letters, digits, '-' or '_' (for example my-style-settings)"
        )
    return name


def as_preset(config: TrainConfig) -> TrainConfig:
    """A preset is settings for any pictures, so it does not remember which pictures these were."""
    return config.replace(data="")


def load_preset(name: str) -> TrainConfig:
    """A shipped preset by its name. A name is never a path: one with a separator or '..' reads as the unknown name
    it is, whatever file it would have reached (another visitor's run config, any .json on the server)."""
    presets = list_presets()
    if not _PRESET_NAME.fullmatch(name) or name not in presets:
        raise ConfigError(f"no preset named {name!r}; available: {', '.join(presets)}")
    return TrainConfig.load(PRESETS_DIR / f"{name}.json")
