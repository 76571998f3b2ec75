"""Loading a base model from a Hub id, a diffusers folder or a single checkpoint file.

Every way this can fail ends in a ModelLoadError that says what was tried and what to do.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from lora_gui import quantization
from lora_gui.errors import ModelLoadError
from lora_gui.families import REGISTRY, Family, detect_family

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class TensorFile(Mapping[str, torch.Tensor]):
    """A .safetensors file's tensors by name, each read from disk when asked for: the names cost only the header."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._names = dict.fromkeys(self._file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_pipeline(
    base_model: str, family: str = "auto", dtype: torch.dtype = torch.float32, quantize: str = "none"
) -> tuple[type[Family], DiffusionPipeline]:
    """Load a base model and tell its family. The VAE always stays in fp32 (fp16 VAEs overflow); the denoiser
    is quantized as `quantize` says (see quantization.py), the rest stays in `dtype`."""
    source = base_model.strip()
    if not source:
        raise ModelLoadError(
            "no base model chosen: give a Hugging Face Hub id, a diffusers folder or a .safetensors file"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but not a diffusers model (it has no model_index.json); "
                "pick the folder that holds model_index.json, or a single .safetensors checkpoint file"
            )
        pipe = _from_pretrained(str(path), dtype, quantize, what=f"the model folder {path}")
    elif path.is_file():
        pipe = _from_single_file(path, family, dtype, quantize)
    elif is_hub_id(source):
        pipe = _from_pretrained(source, dtype, quantize, what=f"the Hugging Face Hub model {source}")
    else:
        raise ModelLoadError(
            f"base model {source!r} not found: there is no such folder or file on this computer, and it is "
            "not a Hugging Face Hub id (those look like owner/name, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return detect_family(pipe, family), pipe


def is_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a Hugging Face Hub id (owner/name) rather than a local path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def _from_pretrained(
    source: str, dtype: torch.dtype, quantize: str, what: str, **components: torch.nn.Module
) -> DiffusionPipeline:
    try:
        # Training and previews need no safety checker; only SD 1.x/2.x pipelines have one to skip.
        index = DiffusionPipeline.load_config(source)
        skip_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        denoiser = next((f.denoiser_name for f in REGISTRY.values() if f.denoiser_name in index), "unet")
        return DiffusionPipeline.from_pretrained(
            source,
            dtype={"default": dtype, "vae": torch.float32},
            quantization_config=quantization.pipeline_config(quantize, denoiser, dtype),
            **skip_checker,
            **components,
        )
    except OSError as error:
        if Path(source).is_dir():
            raise ModelLoadError(f"could not load {what}: {str(error).splitlines()[0]}") from None
        raise ModelLoadError(f"could not load {what}: {_hub_diagnosis(source)}") from None
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load {what}: it looks damaged or incomplete ({error})") from None


def _hub_diagnosis(repo_id: str) -> str:
    """Why a Hub model could not be loaded, found by asking the Hub (only after loading failed)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    not_cached = (
        "it is not in this computer's download cache. Connect to the internet once so it downloads, or pick a "
        "model folder or .safetensors file you already have"
    )
    if constants.HF_HUB_OFFLINE:
        return f"offline mode is on (HF_HUB_OFFLINE) and {not_cached}"
    try:
        files = HfApi().list_repo_files(repo_id)
    except GatedRepoError:
        return (
            "the model is gated: accept its license on huggingface.co, then log in here "
            "(`hf auth login`, or set the HF_TOKEN environment variable) and try again"
        )
    except RepositoryNotFoundError:
        return "no such model on the Hub (or it is private): check the spelling; private models need a login"
    except Exception:
        return f"the Hugging Face Hub could not be reached and {not_cached}"
    if "model_index.json" not in files:
        singles = [name for name in files if name.endswith(".safetensors") and "/" not in name]
        hint = f" It holds {', '.join(singles[:3])}: download one and pick that file." if singles else ""
        return f"it is not a diffusers pipeline (it has no model_index.json).{hint}"
    return "the download failed part-way; try again, and check the free disk space"


def checkpoint_family(path: Path) -> str | None:
    """The family of an original-format checkpoint, from its tensor names alone (nothing is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except Exception as error:
        raise ModelLoadError(f"{path.name} is not a readable .safetensors file ({error})") from None
    for family in REGISTRY.values():
        if any(key.startswith(family.checkpoint_signatures) for key in keys):
            return family.name
    return None


def family_from_files(base_model: str) -> str | None:
    """A base model's family told from its files alone, without loading or downloading anything.

    Works for a diffusers folder, a Hub model already in the download cache (from their config files,
    by each family's `matches_files`), a family's published Hub model
    not downloaded yet (by its name) and a single .safetensors checkpoint (from its tensor names).
    None when the family can't be told that way.
    """
    source = (base_model or "").strip()
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return checkpoint_family(path) if path.suffix.lower() == ".safetensors" else None
        except ModelLoadError:
            return None
    if path.is_dir():
        index, text_encoder = _read_json(path / "model_index.json"), _read_json(path / "text_encoder" / "config.json")
    elif is_hub_id(source):
        index, text_encoder = _cached_json(source, "model_index.json"), _cached_json(source, "text_encoder/config.json")
        if index is None:
            return next((f.name for f in REGISTRY.values() if source.lower() in map(str.lower, f.hub_models)), None)
    else:
        return None
    return next((f.name for f in REGISTRY.values() if f.matches_files(index or {}, text_encoder)), None)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def _cached_json(repo_id: str, filename: str) -> dict[str, Any] | None:
    """A file of a Hub model if it is in the download cache; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # a name huggingface_hub refuses as a repo id
        return None
    return _read_json(Path(cached)) if isinstance(cached, str) else None


def _from_single_file(path: Path, family: str, dtype: torch.dtype, quantize: str) -> DiffusionPipeline:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name} is a pickled checkpoint, which can run code when loaded; use the .safetensors "
            "version of the model instead"
        )
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name} is not a model file: pick a .safetensors checkpoint or a diffusers folder")
    detected = checkpoint_family(path)
    name = family if family != "auto" else detected
    if name is None:
        raise ModelLoadError(
            f"{path.name} is not a Stable Diffusion checkpoint this trainer knows (its tensor names match "
            f"none of {', '.join(REGISTRY)}); if it is one, set the model family by hand"
        )
    if name not in REGISTRY:
        raise ModelLoadError(f"{path.name} is a {name} checkpoint, which this trainer does not support yet")
    known = REGISTRY[name]
    quantization.check_single_file(quantize)
    tensors = TensorFile(path)
    companions = known.single_file_companions(tensors)
    if companions:
        return _with_companion(path, known, tensors, companions, dtype, quantize)
    try:
        # A pipeline loads from one file unquantized; a quantized denoiser is loaded from it first, on its own.
        denoiser = (
            {}
            if quantize == "none"
            else {
                known.denoiser_name: quantization.quantize_loaded(
                    known.denoiser_class.from_single_file(str(path), dtype=dtype), quantize
                )
            }
        )
        return known.pipeline_class.from_single_file(str(path), dtype=dtype, **denoiser)
    except OSError as error:
        raise ModelLoadError(
            f"could not read {path.name} as a {known.title} checkpoint: a single-file checkpoint needs "
            "its family's configuration, downloaded once from the Hugging Face Hub, and that failed "
            f"({str(error).splitlines()[0]}). Connect to the internet once, or use the model's diffusers folder"
        ) from None
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not read {path.name} as a {known.title} checkpoint: {error}") from None


def _with_companion(
    path: Path,
    family: type[Family],
    tensors: Mapping[str, torch.Tensor],
    companions: tuple[str, ...],
    dtype: torch.dtype,
    quantize: str,
) -> DiffusionPipeline:
    """The denoiser from a family's single file, with the configuration, VAE and text encoders of the first of
    its published models (`companions`) in the download cache, else of the first, downloaded now."""
    from huggingface_hub import constants

    companion = next((repo for repo in companions if _cached_json(repo, "model_index.json") is not None), None)
    if companion is None and constants.HF_HUB_OFFLINE:
        raise ModelLoadError(_companion_missing(path, family, companions))
    companion = companion or companions[0]
    try:
        weights, shape = family.denoiser_from_single_file(tensors)
        denoiser = family.denoiser_class.from_single_file(
            weights,
            config=companion,
            subfolder=family.denoiser_name,
            dtype=dtype,
            **shape,
        )
        quantization.quantize_loaded(denoiser, quantize)
    except OSError:
        raise ModelLoadError(
            f"{_companion_needed(path, family, companion)}, and it could not be loaded: {_hub_diagnosis(companion)}"
        ) from None
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not read {path.name} as a {family.title} checkpoint: {error}") from None
    log.info("%s: the %s from the file, the rest of the model from %s", path.name, family.denoiser_title, companion)
    what = f"{companion}, which {path.name} takes its VAE and text encoders from"
    return _from_pretrained(companion, dtype, "none", what, **{family.denoiser_name: denoiser})


def _companion_needed(path: Path, family: type[Family], companion: str) -> str:
    return (
        f"{path.name} is a {family.title} {family.denoiser_title} in one file; the VAE, text encoders and "
        f"configuration that go with it come from {companion}"
    )


def _companion_missing(path: Path, family: type[Family], companions: tuple[str, ...]) -> str:
    """What to do when none of the models a single file needs is on this computer and downloads are off."""
    others = "".join(f" (or {repo})" for repo in companions[1:])
    return (
        f"{_companion_needed(path, family, companions[0])}, which is not in this computer's download cache, and "
        f"offline mode is on (HF_HUB_OFFLINE). Connect to the internet once and load {companions[0]}{others} as "
        "the base model so that it downloads (if it is gated, accept its license on huggingface.co and log in "
        "first); from then on this file loads offline too. Or use a diffusers folder of the model as the base model"
    )
