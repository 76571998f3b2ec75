"""The base models a visitor may pick or type: the offline ones of the menu, this server's rule for the rest
(`BaseModelPolicy`), and which Hugging Face token a download goes out with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_gui.config import TrainConfig, list_presets, load_preset
from lora_gui.demo import (
    DEMO_EDIT_PRESET,
    DEMO_MODEL,
    DEMO_PRESET,
    demo_config,
    demo_edit_family,
    demo_family,
    ensure_demo_edit_model,
)
from lora_gui.errors import ConfigError
from lora_gui.families import REGISTRY
from lora_gui.owners import EVERYONE, Visitor

if TYPE_CHECKING:
    from lora_gui.downloads import HubToken
    from lora_gui.model_policy import BaseModelPolicy

TINY_CHOICE = "Demo model (offline, CPU: draws shapes)"  # trained, shipped, what the demo uses
DEMO_FAMILY = demo_family()
EDIT_DEMO_FAMILY = demo_edit_family()
# The offline models of each family by their menu names, so every family can be tried offline: the demo model's
# family has the demo model (demo.DEMO_MODEL, trained on drawn shapes), the edit demo's its model (its kin that
# learns edits, assembled under the runs folder), the others tiny random-weight models.
TINY_CHOICES = {
    TINY_CHOICE: DEMO_FAMILY,
    **{
        f"Tiny {family.short_title} demo (offline, CPU)": name
        for name, family in REGISTRY.items()
        if name != DEMO_FAMILY
    },
}
EDIT_DEMO_CHOICE = next(choice for choice, family in TINY_CHOICES.items() if family == EDIT_DEMO_FAMILY)
# The offline models that were trained (they draw the demo's world at 64 px); the others are random.
TRAINED_CHOICES = (TINY_CHOICE, EDIT_DEMO_CHOICE)
MODELS_FOLDER = ".models"  # under the runs dir, so the Space's persistent storage keeps the tiny models
ALLOW_PATHS_ENV = "LORA_GUI_ALLOW_PATHS"
BASE_MODELS_ENV = "LORA_GUI_BASE_MODELS"  # comma-separated Hub ids: the only ones this server accepts
MAX_MODEL_GB_ENV = "LORA_GUI_MAX_MODEL_GB"
SPACE_MAX_MODEL_GB = 40.0  # a Space's disk is small and shared by every visitor's downloads
# The menu's models whose licence must be accepted on the Hub before a download (the others download without a
# token): the Train tab shows the token box for these, and for Hub ids typed in, which may be gated or private.
GATED_MODELS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.2-klein-base-9B")


def quick_settings(choice: str) -> TrainConfig:
    """The settings a demo or tiny model is made for: the demo's (64 px, a few hundred steps, a high learning rate,
    which such a small model takes), and for the demo model itself its text encoder learning too, as Try the demo
    trains it. Not for a real model: its family's own size and the usual defaults are."""
    if choice == EDIT_DEMO_CHOICE:
        return load_preset(DEMO_EDIT_PRESET)
    return demo_config() if choice == TINY_CHOICE else load_preset(DEMO_PRESET)


def paths_allowed(on_space: bool) -> bool:
    """Visitors of a Hugging Face Space may not read the server's files unless its owner allows it."""
    if os.environ.get(ALLOW_PATHS_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    return not on_space


def allowed_models(on_space: bool) -> tuple[tuple[str, ...], int | None]:
    """The server's environment's rule for base models: the Hub ids it takes (none named: any), and the largest
    download in bytes (None: no limit)."""
    allowed = tuple(name.strip() for name in os.environ.get(BASE_MODELS_ENV, "").split(",") if name.strip())
    limit = os.environ.get(MAX_MODEL_GB_ENV, "").strip()
    try:
        max_gb = float(limit) if limit else (SPACE_MAX_MODEL_GB if on_space else None)
    except ValueError:
        raise ConfigError(f"{MAX_MODEL_GB_ENV} must be a number of gigabytes, not {limit!r}") from None
    return allowed, None if max_gb is None else int(max_gb * 1e9)


@dataclass
class ModelChoices:
    """The base models of this server's page: the menu, what each choice loads, and who may load what."""

    runs_dir: Path
    allow_paths: bool  # whether visitors may name the server's files (a folder, a checkpoint)
    on_space: bool

    def __post_init__(self) -> None:
        allowed_models(self.on_space)  # a mistyped limit stops the app as it starts, not a visitor's run

    def tiny_model(self, family: str) -> Path:
        """A family's offline model: the demo model's family's is the demo model shipped with the app; the edit
        demo's is assembled from the shipped parts, and the others are random, under the runs folder, both the
        first time they are asked for."""
        if family == DEMO_FAMILY:
            return DEMO_MODEL
        if family == EDIT_DEMO_FAMILY:
            return self.runs_dir / MODELS_FOLDER / "demo-edit"
        return self.runs_dir / MODELS_FOLDER / f"tiny-{family}"

    @property
    def policy(self) -> BaseModelPolicy:
        """Where visitors may not use the server's files, base models are Hub ids only, never looked up on disk."""
        from lora_gui.model_policy import BaseModelPolicy

        own = tuple(str(self.tiny_model(family)) for family in TINY_CHOICES.values())
        allowed, max_bytes = allowed_models(self.on_space)
        return BaseModelPolicy(not self.allow_paths, allowed, max_bytes, own)

    def resolve(self, choice: str, token: HubToken = None) -> str:
        """What the trainer loads for a base-model choice: a tiny demo model (written the first time), or the Hub
        id / path as typed, once this server's policy takes it (a Hub model's size is read from the Hub, with
        `token`)."""
        from lora_gui.model_policy import HUB_IDS_ONLY, is_hub_id
        from lora_gui.tiny import ensure_tiny_model

        choice = (choice or "").strip()
        if choice in TINY_CHOICES:
            family = TINY_CHOICES[choice]
            if family == EDIT_DEMO_FAMILY:
                return str(ensure_demo_edit_model(self.tiny_model(family)))
            return str(ensure_tiny_model(self.tiny_model(family), family))
        if not choice:
            raise ConfigError(f"choose a base model first ({TINY_CHOICE} needs no download)")
        policy = self.policy
        if policy.hub_only and not is_hub_id(choice):
            # The same words whatever the server holds: what exists there is not a visitor's to learn.
            raise ConfigError(
                f"{HUB_IDS_ONLY}. This Space does not let visitors use files on the server; its owner can allow "
                f"it by setting {ALLOW_PATHS_ENV}=1"
            )
        if is_hub_id(choice) and (policy.hub_only or not Path(choice).expanduser().exists()):
            policy.check_hub_model(choice, token)
        return choice

    def hub_token(self, typed: str | None, visitor: Visitor = EVERYONE) -> HubToken:
        """The Hugging Face token a visitor's download or upload goes out with: the one typed in, else the one
        their Hugging Face sign-in gave. Else, on a Space, none at all: never the owner's login, under which a
        visitor would download gated models whose licence they never accepted; elsewhere, this computer's login."""
        return (typed or "").strip() or visitor.hub_token or (False if self.on_space else None)

    def label(self, base_model: str) -> str:
        """How a stored base model is shown: a tiny model by its menu name, anything else as it is."""
        for choice, family in TINY_CHOICES.items():
            if base_model and Path(base_model).resolve() == self.tiny_model(family).resolve():
                return choice
        return base_model

    def needs_token(self, choice: str) -> bool:
        """Whether a download of this choice may need a Hugging Face token: a gated model of the menu, or a Hub id
        typed in (it may be gated or private); never a tiny model or a file on this computer."""
        from lora_gui.model_policy import is_hub_id

        choice = (choice or "").strip()
        if choice in TINY_CHOICES or not is_hub_id(choice):
            return False
        if self.allow_paths and Path(choice).expanduser().exists():
            return False
        return choice in GATED_MODELS or choice not in self.choices()

    def choices(self) -> list[str]:
        """The tiny demo models, then every base model a preset names (so new families appear with their presets)."""
        named = [load_preset(name).base_model for name in list_presets()]
        return [*TINY_CHOICES, *dict.fromkeys(model for model in named if model)]

    def family(self, choice: str) -> str | None:
        """The family of a base-model choice where it can be told without downloading: a tiny model,
        a model folder or checkpoint file on this server, or a Hub model already downloaded once."""
        from lora_gui.base_models import family_from_files

        choice = (choice or "").strip()
        if choice in TINY_CHOICES:
            return TINY_CHOICES[choice]
        return family_from_files(choice, self.policy)
