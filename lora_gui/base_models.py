"""Loading a base model from a Hub id, a diffusers folder or a single checkpoint file (a Flux transformer file with
the rest of its published model); telling a model's family, and its denoiser's size, from its files alone.

Every way loading can fail ends in a ModelLoadError that says what was tried and what to do. The download itself
is `downloads.py`'s; which base models a server takes, `model_policy.py`'s.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from lora_gui import quantization
from lora_gui.downloads import NOT_ON_THE_HUB, PICKLE_SUFFIXES, DownloadProgress, HubToken, download, gated_advice
from lora_gui.errors import ModelLoadError
from lora_gui.families import REGISTRY, Family, detect_family, family_of_configs
from lora_gui.model_policy import ANY_BASE_MODEL, BaseModelPolicy, is_hub_id

log = logging.getLogger(__name__)


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
    base_model: str,
    family: str = "auto",
    dtype: torch.dtype = torch.float32,
    quantize: str = "none",
    *,
    token: HubToken = None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
    policy: BaseModelPolicy = ANY_BASE_MODEL,
) -> tuple[type[Family], DiffusionPipeline]:
    """Load a base model and tell its family. The VAE always stays in fp32 (fp16 VAEs overflow); the denoiser
    is quantized as `quantize` says (see quantization.py), the rest stays in `dtype`.

    A Hub model is downloaded first (see `download`), with `token`, its progress told to `on_progress`, within
    what `policy` allows."""
    source = base_model.strip()
    if not source:
        raise ModelLoadError(
            "no base model chosen: give a Hugging Face Hub id, a diffusers folder or a .safetensors file"
        )
    policy.check_name(source)
    path = Path(source).expanduser()
    if not policy.looks_on_disk(source):
        pipe = _from_hub(source, dtype, quantize, token, on_progress, policy.max_bytes)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but not a diffusers model (it has no model_index.json); "
                "pick the folder that holds model_index.json, or a single .safetensors checkpoint file"
            )
        pipe = _from_pretrained(str(path), dtype, quantize, what=f"the model folder {path}")
    elif path.is_file():
        pipe = _from_single_file(path, family, dtype, quantize, token, on_progress)
    elif is_hub_id(source):
        pipe = _from_hub(source, dtype, quantize, token, on_progress, policy.max_bytes)
    else:
        raise ModelLoadError(
            f"base model {source!r} not found: there is no such folder or file on this computer, and it is "
            "not a Hugging Face Hub id (those look like owner/name, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    detected = detect_family(pipe, family)
    detected.prepare_pipeline(pipe)
    return detected, pipe


def fetch(
    base_model: str,
    token: HubToken = None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
    policy: BaseModelPolicy = ANY_BASE_MODEL,
) -> None:
    """A Hub model's files into the download cache before it loads, where a choice needs them first (its family
    and size); a folder or file on disk is already here. Loading it afterwards downloads nothing more."""
    source = (base_model or "").strip()
    if not source:
        return
    policy.check_name(source)
    path = Path(source).expanduser()
    if is_hub_id(source) and not (policy.looks_on_disk(source) and path.exists()):
        download(source, token, on_progress, max_bytes=policy.max_bytes)


def _from_hub(
    repo_id: str,
    dtype: torch.dtype,
    quantize: str,
    token: HubToken,
    on_progress: Callable[[DownloadProgress], None] | None,
    max_bytes: int | None,
) -> DiffusionPipeline:
    download(repo_id, token, on_progress, max_bytes=max_bytes)
    what = f"the Hugging Face Hub model {repo_id}"
    # Loaded from its folder in the download cache, never by its id: diffusers would take a folder of the server's
    # named like the id (owner/name) first, and what loads or fails there would tell a visitor what it holds.
    snapshot = _cached_snapshot(repo_id)
    if snapshot is None:
        raise ModelLoadError(f"could not load {what}: {_hub_diagnosis(repo_id, token)}")
    return _from_pretrained(str(snapshot), dtype, quantize, what=what, token=token, hub_id=repo_id)


def _from_pretrained(
    source: str,
    dtype: torch.dtype,
    quantize: str,
    what: str,
    token: HubToken = None,
    hub_id: str | None = None,  # the Hub model whose cached snapshot `source` is
    **components: torch.nn.Module,
) -> DiffusionPipeline:
    try:
        # Training and previews need no safety checker; only SD 1.x/2.x pipelines have one to skip.
        index = DiffusionPipeline.load_config(source, token=token)
        skip_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        denoiser = _denoiser_component(index) or "unet"
        shapes = _folder_shapes(_model_folder(source), denoiser) or {}
        widths = {shape[1] for shape in shapes.values() if len(shape) == 2}  # the linear layers' inputs
        return DiffusionPipeline.from_pretrained(
            source,
            dtype={"default": dtype, "vae": torch.float32},
            quantization_config=quantization.pipeline_config(quantize, denoiser, dtype, widths),
            token=token,
            **skip_checker,
            **components,
        )
    except OSError as error:
        if hub_id is None and Path(source).is_dir():
            raise ModelLoadError(f"could not load {what}: {str(error).splitlines()[0]}") from None
        raise ModelLoadError(f"could not load {what}: {_hub_diagnosis(hub_id or source, token)}") from None
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load {what}: it looks damaged or incomplete ({error})") from None


def _hub_diagnosis(repo_id: str, token: HubToken = None) -> str:
    """Why a Hub model could not be loaded, found by asking the Hub (only after loading failed)."""
    from huggingface_hub import HfApi

    not_cached = (
        "it is not in this computer's download cache. Connect to the internet once so it downloads, or pick a "
        "model folder or .safetensors file you already have"
    )
    if constants.HF_HUB_OFFLINE:
        return f"offline mode is on (HF_HUB_OFFLINE) and {not_cached}"
    try:
        files = HfApi(token=token).list_repo_files(repo_id)
    except GatedRepoError:
        return f"the model is gated: {gated_advice(repo_id, token)}"
    except RepositoryNotFoundError:
        return NOT_ON_THE_HUB
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
    # The newest family first: a later family's checkpoints may hold an earlier one's signature too (Flux.2's
    # double_blocks. are Flux.1's), never its own signature the other way round.
    for family in reversed(REGISTRY.values()):
        if family.is_checkpoint(keys):
            return family.name
    return None


def family_from_files(base_model: str, policy: BaseModelPolicy = ANY_BASE_MODEL) -> str | None:
    """A base model's family told from its files alone, without loading or downloading anything.

    Works for a diffusers folder, a Hub model already in the download cache (from their config files,
    by each family's `matches_files`), a family's published Hub model
    not downloaded yet (by its name) and a single .safetensors checkpoint (from its tensor names).
    None when the family can't be told that way. A hub-only `policy` never looks `base_model` up as a path.
    """
    source = (base_model or "").strip()
    path = Path(source).expanduser() if policy.looks_on_disk(source) else None
    if path is not None and path.is_file():
        try:
            return checkpoint_family(path) if path.suffix.lower() == ".safetensors" else None
        except ModelLoadError:
            return None
    if path is not None and path.is_dir():
        index, text_encoder = _read_json(path / "model_index.json"), _read_json(path / "text_encoder" / "config.json")
    elif is_hub_id(source):
        index, text_encoder = _cached_json(source, "model_index.json"), _cached_json(source, "text_encoder/config.json")
        if index is None:
            return _published_family(source)
    else:
        return None
    return family_of_configs(index or {}, text_encoder)


def denoiser_parameters_on_disk(base_model: str, policy: BaseModelPolicy = ANY_BASE_MODEL) -> int | None:
    """How many parameters this model's own denoiser has, read from its files' headers (nothing is loaded): a
    diffusers folder, a Hub model in the download cache, or a single checkpoint (its denoiser's tensors, or all
    of a file that holds only the denoiser). None where its files are not here or not safetensors: a fine-tune or
    a pruned model is sized as it is, not as its family's published model."""
    source = (base_model or "").strip()
    path = Path(source).expanduser() if policy.looks_on_disk(source) else None
    if path is not None and path.is_file():
        shapes = _file_shapes(path) if path.suffix.lower() == ".safetensors" else None
        if shapes is not None and any(name.startswith(SINGLE_FILE_DENOISER) for name in shapes):
            shapes = {name: shape for name, shape in shapes.items() if name.startswith(SINGLE_FILE_DENOISER)}
    else:
        folder = path if path is not None and path.is_dir() else _cached_snapshot(source)
        index = _read_json(folder / "model_index.json") if folder else None
        denoiser = _denoiser_component(index or {})
        shapes = _folder_shapes(folder, denoiser) if folder and denoiser else None
    return sum(math.prod(shape) for shape in shapes.values()) if shapes else None


def _denoiser_component(model_index: dict[str, Any]) -> str | None:
    """Which of a diffusers model's folders holds its denoiser (unet, transformer), by what the families name."""
    return next((f.denoiser_name for f in REGISTRY.values() if f.denoiser_name in model_index), None)


# Where a single checkpoint holding a whole model (A1111's, ComfyUI's) keeps its denoiser.
SINGLE_FILE_DENOISER = "model.diffusion_model."


def _model_folder(source: str) -> Path | None:
    """A diffusers model's folder: itself, or a Hub model's snapshot in the download cache (never downloads)."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    return _cached_snapshot(source)


def _cached_snapshot(source: str) -> Path | None:
    """A Hub model's snapshot folder in the download cache, if its model_index.json is there (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "model_index.json")
    except ValueError:  # a name huggingface_hub refuses as a repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _folder_shapes(folder: Path | None, component: str) -> dict[str, tuple[int, ...]] | None:
    """The tensor shapes of a component's safetensors files in a diffusers folder."""
    files = sorted((folder / component).glob("*.safetensors")) if folder else []
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(_file_shapes(file) or {})
    return shapes or None


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            return {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    except Exception:  # unreadable or not safetensors: the caller falls back on what the family publishes
        return None


def _published_family(repo_id: str) -> str | None:
    return next((f.name for f in REGISTRY.values() if repo_id.lower() in map(str.lower, f.hub_models)), None)


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


def _from_single_file(
    path: Path,
    family: str,
    dtype: torch.dtype,
    quantize: str,
    token: HubToken,
    on_progress: Callable[[DownloadProgress], None] | None,
) -> DiffusionPipeline:
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
            f"{path.name} is not a checkpoint of a model this trainer knows (its tensor names match "
            f"none of {', '.join(REGISTRY)}); if it is one, set the model family by hand"
        )
    if name not in REGISTRY:
        raise ModelLoadError(f"{path.name} is a {name} checkpoint, which this trainer does not support yet")
    known = REGISTRY[name]
    quantization.check_single_file(quantize)
    tensors = TensorFile(path)
    companions = known.single_file_companions(tensors)
    if companions:
        return _with_companion(path, known, tensors, companions, dtype, quantize, token, on_progress)
    try:
        # A pipeline loads from one file unquantized; a quantized denoiser is loaded from it first, on its own.
        denoiser = (
            {}
            if quantize == "none"
            else {
                known.denoiser_name: quantization.quantize_loaded(
                    known.denoiser_class.from_single_file(str(path), dtype=dtype), quantize, dtype
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
    token: HubToken,
    on_progress: Callable[[DownloadProgress], None] | None,
) -> DiffusionPipeline:
    """The denoiser from a family's single file, with the configuration, VAE and text encoders of the first of
    its published models (`companions`) in the download cache, else of the first, downloaded now."""
    companion = next((repo for repo in companions if _cached_json(repo, "model_index.json") is not None), None)
    if companion is None and constants.HF_HUB_OFFLINE:
        raise ModelLoadError(_companion_missing(path, family, companions))
    companion = companion or companions[0]
    try:
        # The companion's own denoiser weights are not needed: only its configuration.
        download(companion, token, on_progress, configs_only=(family.denoiser_name,))
    except ModelLoadError as error:
        raise ModelLoadError(f"{_companion_needed(path, family, companion)}; {error}") from None
    try:
        weights, shape = family.denoiser_from_single_file(tensors)
        denoiser = family.denoiser_class.from_single_file(
            weights,
            config=companion,
            subfolder=family.denoiser_name,
            dtype=dtype,
            token=token,
            **shape,
        )
        quantization.quantize_loaded(denoiser, quantize, dtype)
    except OSError:
        raise ModelLoadError(
            f"{_companion_needed(path, family, companion)}, and it could not be loaded: "
            f"{_hub_diagnosis(companion, token)}"
        ) from None
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not read {path.name} as a {family.title} checkpoint: {error}") from None
    log.info("%s: the %s from the file, the rest of the model from %s", path.name, family.denoiser_title, companion)
    what = f"{companion}, which {path.name} takes its VAE and text encoders from"
    return _from_pretrained(companion, dtype, "none", what, token, **{family.denoiser_name: denoiser})


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
        "the base model so that it downloads (if it is gated, accept its licence on its page and give a Hugging "
        "Face token); from then on this file loads offline too. Or use a diffusers folder of the model as the base "
        "model"
    )
