"""Resizing a LoRA to a lower rank and merging several into one, from a run or a file made elsewhere.

Every layer's update is one matrix: up @ down * alpha / rank (a convolution's down weight flattened to
rank x (in * kernel)). Resizing keeps the largest singular values of that matrix, as kohya's
sd-scripts (networks/resize_lora.py) does, and reports the energy kept: the share of the squared singular
values, per layer and overall (the least and the mean). Merging stacks the layers (exact: the ranks add, each
LoRA's strength and alpha / rank folded into its up weights) or cuts the sum of their updates to a rank by
the same SVD.

Unlike kohya, who keeps each file's alpha / rank, what this writes has alpha = rank in every layer (scale 1):
the singular values are in the weights (their square root on each side), so the file means the same in every
tool whatever it assumes about alpha.

A result is written in both layouts: kohya's at the path asked for (A1111, Forge, ComfyUI), and diffusers'
beside it as `<name>.diffusers.safetensors` (`diffusers_twin`), both with kohya's metadata saying what was done
(`ss_network_dim`, `ss_network_alpha`, and the note in `ss_training_comment` and `modelspec.description`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from lora_gui.adapters import CANONICAL_TEXT_PREFIX
from lora_gui.atomic import atomic_path
from lora_gui.errors import LoraFileError
from lora_gui.families import REGISTRY, Family, family_of_lora, get_family
from lora_gui.lora_files.detect import detect_layout
from lora_gui.lora_files.diffusers_layout import read_diffusers_lora
from lora_gui.lora_files.kohya_layout import ALPHA, DOWN, UP, kohya_prefixes, peft_scale, save_kohya_lora, to_kohya
from lora_gui.lora_files.metadata import lora_metadata
from lora_gui.runs import RunFolder, TrainingRecord, default_runs_dir

log = logging.getLogger(__name__)

TOOLS = "tools"  # where the app writes a run's resized and merged LoRAs: <run>/tools/
PLAIN_ONLY = "resizing and merging work on plain LoRA files only"
# Metadata that describes the old tensors, recomputed (hashes) or dropped when the tensors change.
_STALE = re.compile(r"^(sshs_|modelspec\.hash_)")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<module>lora_(?:unet|te\d?)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass
class Layer:
    """One adapted layer: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]) and alpha (the update's scale times
    the rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The layer's whole update, out x (in * kernel), in float32."""
        return self.up.flatten(1).float() @ self.down.flatten(1).float() * (self.alpha / self.rank)

    def at_scale_one(self, strength: float) -> Layer:
        """The same update times `strength`, with alpha / rank folded into the up weights."""
        return Layer(self.down.float(), self.up.float() * (strength * self.alpha / self.rank), float(self.rank))


@dataclass
class Lora:
    """A plain LoRA in diffusers' names (`<component>.<module>`, CLIP under `text_model.`), whatever its file."""

    family: type[Family]
    layers: dict[str, Layer]
    metadata: dict[str, str]  # what the source says about its training (kohya's ss_*, modelspec)
    name: str  # the source's file or run name, for notes
    dtype: torch.dtype = torch.float32

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())


@dataclass
class Reshaped:
    """What resize or merge made, and how much of the update each layer kept."""

    lora: Lora
    note: str
    energy: dict[str, float] = field(default_factory=dict)  # layer -> share of the squared singular values kept
    files: list[Path] = field(default_factory=list)  # once written: the kohya file, then its diffusers twin

    @property
    def least_energy(self) -> float:
        return min(self.energy.values(), default=1.0)

    @property
    def mean_energy(self) -> float:
        return sum(self.energy.values()) / len(self.energy) if self.energy else 1.0


def resize_lora(source: str | Path, rank: int, output: str | Path) -> Reshaped:
    """Read a run's or a file's LoRA, cut it to `rank` and write it (kohya's layout at `output`, diffusers' beside)."""
    return write(resize(read_lora(source), rank), output)


def merge_loras(sources: list[tuple[str | Path, float]], output: str | Path, rank: int | None = None) -> Reshaped:
    """Read these LoRAs (runs or files, each with its strength), merge them and write the result as `resize_lora`
    does."""
    return write(merge([(read_lora(source), strength) for source, strength in sources], rank), output)


def locate(source: str, runs_dir: str | Path = "") -> Path:
    """A LoRA the command line names: a file or run folder as given, or else a run's name in `runs_dir`."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    run = Path(runs_dir or default_runs_dir()) / source
    if run.is_dir():
        return run
    raise LoraFileError(f"{source} is neither a LoRA file, a run folder nor the name of a run in {run.parent}")


# ---- the one SVD -----------------------------------------------------------------------------------
def low_rank(delta: torch.Tensor, rank: int, like: Layer) -> tuple[Layer, float]:
    """The best rank-`rank` approximation of `delta` as a layer shaped like `like` (alpha = rank), and the share
    of the squared singular values it keeps."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    # A convolution's up weight is a 1x1 kernel; its down weight holds the layer's whole kernel.
    down = (root[:, None] * vh[:rank]).reshape(rank, *like.down.shape[1:])
    up = (u[:, :rank] * root).reshape(like.up.shape[0], rank, *like.up.shape[2:])
    total = float(s.square().sum())
    kept = float(s[:rank].square().sum()) / total if total > 0 else 1.0
    return Layer(down.contiguous(), up.contiguous(), float(rank)), kept


def resize(lora: Lora, rank: int) -> Reshaped:
    """Every layer cut to at most `rank` (a layer of a lower rank keeps its own)."""
    _check_rank(rank)
    layers, energy = {}, {}
    for name, layer in lora.layers.items():
        layers[name], energy[name] = low_rank(layer.delta(), min(rank, layer.rank), layer)
    resized = Lora(lora.family, layers, lora.metadata, lora.name, lora.dtype)
    result = Reshaped(resized, "", energy)
    result.note = f"resized from rank {lora.rank} to {resized.rank}, {_energy_words(result)}"
    return result


def merge(loras: list[tuple[Lora, float]], rank: int | None = None) -> Reshaped:
    """One LoRA that does what these do together at these strengths: their layers stacked (the ranks add), or,
    with `rank`, the sum of their updates cut to that rank."""
    if len(loras) < 2:
        raise LoraFileError("merging takes two LoRAs or more")
    if rank is not None:
        _check_rank(rank)
    first = loras[0][0]
    for lora, _ in loras[1:]:
        # Families with the same parts (SD 1 and 2) can't be told apart by a file without metadata: their layers'
        # shapes tell, below.
        if kohya_prefixes(lora.family) != kohya_prefixes(first.family):
            raise LoraFileError(
                f"{lora.name} is for {lora.family.title} and {first.name} for {first.family.title}; "
                "only LoRAs for the same kind of base model can be merged"
            )
    names = list(dict.fromkeys(name for lora, _ in loras for name in lora.layers))
    layers, energy = {}, {}
    for name in names:
        parts = [lora.layers[name].at_scale_one(strength) for lora, strength in loras if name in lora.layers]
        if len({(part.down.shape[1:], part.up.shape[0]) for part in parts}) > 1:
            raise LoraFileError(f"the LoRAs adapt {name} with different shapes: are they for the same base model?")
        if rank is None:
            down, up = torch.cat([part.down for part in parts]), torch.cat([part.up for part in parts], dim=1)
            layers[name] = Layer(down, up, float(down.shape[0]))
        else:
            total = sum(part.delta() for part in parts)
            layers[name], energy[name] = low_rank(total, min(rank, sum(part.rank for part in parts)), parts[0])
    merged = Lora(first.family, layers, first.metadata, "merged", first.dtype)
    result = Reshaped(merged, "", energy)
    result.note = "merged " + " + ".join(f"{lora.name} x{float(strength)!r}" for lora, strength in loras)
    if rank is not None:
        result.note += f", cut to rank {merged.rank}, {_energy_words(result)}"
    return result


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise LoraFileError(f"a LoRA's rank is a whole number of at least 1, not {rank}")


def _energy_words(result: Reshaped) -> str:
    return f"{result.mean_energy:.1%} of the energy kept (least in a layer: {result.least_energy:.1%})"


# ---- reading ---------------------------------------------------------------------------------------
def read_lora(source: str | Path) -> Lora:
    """A run's LoRA (its folder) or a LoRA file in diffusers' or kohya's layout, as plain layers."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_run(RunFolder(path))
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{path.name}: {PLAIN_ONLY} in .safetensors files")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
            metadata = handle.metadata() or {}
    except Exception as error:
        raise LoraFileError(f"{path.name} can't be read as a LoRA file ({type(error).__name__}: {error})") from None
    layout = detect_layout(list(tensors))
    if layout.name not in ("kohya (A1111 / ComfyUI)", "diffusers (peft)"):
        raise LoraFileError(f"{path.name} is a {layout.name} file; {PLAIN_ONLY} (kohya's or diffusers' layout)")
    family = _family_of(metadata, list(tensors))
    if layout.name.startswith("diffusers"):
        layers = _peft_layers(tensors, _adapter_configs(metadata), path.name)
    else:
        layers = _kohya_layers(tensors, family, path.name)
    kohya_metadata = {key: value for key, value in metadata.items() if key.startswith(("ss_", "modelspec."))}
    return Lora(family, layers, kohya_metadata, path.name, next(iter(tensors.values())).dtype)


def _read_run(run: RunFolder) -> Lora:
    if not run.diffusers_lora.is_file():
        raise LoraFileError(f"{run.name} holds no LoRA yet: has its training saved one?")
    state, configs = read_diffusers_lora(run.diffusers_lora)
    record = TrainingRecord.load(run)
    layers = _peft_layers(state, configs, run.name)
    dtype = next(iter(state.values())).dtype
    return Lora(get_family(record.family), layers, lora_metadata(run, record, configs), run.name, dtype)


def _adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """Each component's LoraConfig as diffusers stores it in a file's metadata; empty when there is none."""
    configs: dict[str, dict] = {}
    for key, value in json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY, "{}")).items():
        component, _, setting = key.partition(".")
        configs.setdefault(component, {})[setting] = value
    return configs


def _peft_layers(tensors: dict[str, torch.Tensor], configs: dict[str, dict], name: str) -> dict[str, Layer]:
    """Layers named `<component>.<module>.lora_A/B.weight`; alpha from the LoraConfig, a `.alpha` tensor (kohya's
    Flux files) or, without either, the rank (what diffusers assumes)."""
    if any(config.get("use_dora") for config in configs.values()):
        raise LoraFileError(f"{name} is a DoRA LoRA; {PLAIN_ONLY}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        elif not key.endswith(f".{ALPHA}"):
            raise LoraFileError(f"{name} holds {key}, which is not part of a plain LoRA layer; {PLAIN_ONLY}")
    layers = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise LoraFileError(f"{name} holds only half of {module} (a down or an up weight without the other)")
        rank = pair["A"].shape[0]
        component, _, inner = module.partition(".")
        if component in configs:
            alpha = peft_scale(configs[component], inner) * rank
        else:
            alpha = float(tensors[f"{module}.{ALPHA}"]) if f"{module}.{ALPHA}" in tensors else float(rank)
        layers[module] = Layer(pair["A"], pair["B"], alpha)
    return layers


def _kohya_layers(tensors: dict[str, torch.Tensor], family: type[Family], name: str) -> dict[str, Layer]:
    """Layers named as kohya names them (`lora_unet_<path with _>`), read back into diffusers' names."""
    components = {prefix: component for component, prefix in kohya_prefixes(family).items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise LoraFileError(f"{name} holds {key}, which is not part of a plain LoRA layer; {PLAIN_ONLY}")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    layers = {}
    for kohya, found in parts.items():
        prefix = next((prefix for prefix in sorted(components, key=len, reverse=True) if kohya.startswith(prefix)), "")
        path = _module_path(family, kohya[len(prefix) + 1 :]) if prefix else None
        if path is None:
            raise LoraFileError(
                f"{name} adapts {kohya}, which names no {family.title} layer in diffusers' names; a file in the "
                "model's original names (SDXL's input_blocks, Flux's double_blocks) can't be resized or merged here"
            )
        if DOWN not in found or UP not in found:
            raise LoraFileError(f"{name} holds only half of {kohya} (a down or an up weight without the other)")
        rank = found[DOWN].shape[0]
        alpha = float(found[ALPHA]) if ALPHA in found else float(rank)
        layers[f"{components[prefix]}.{path}"] = Layer(found[DOWN], found[UP], alpha)
    return layers


def _module_path(family: type[Family], flat: str) -> str | None:
    """A module path from kohya's flattened one ("_" for "."), joining back the names that hold "_" themselves
    (`down_blocks`, `to_q`, `self_attn`); None when a part names nothing in such a model."""
    known = _layer_names(family)
    words, path = flat.split("_"), []
    while words:
        size = next(size for size in range(len(words), 0, -1) if size == 1 or "_".join(words[:size]) in known)
        word = "_".join(words[:size])
        if not (word.isdigit() or word in known):
            return None
        path.append(word)
        words = words[size:]
    return ".".join(path)


@functools.cache
def _layer_names(family: type[Family]) -> frozenset[str]:
    """The names of the layers of the family's denoiser and of CLIP (each level of their module paths), read
    from a tiny model of each: the same names as the full-size ones, with fewer blocks."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clip = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, projection_dim=8)
    )
    names = {"text_model"}  # canonical CLIP names start with it, as kohya's do (kohya_layout)
    for model in (family.build_denoiser("tiny"), clip):
        names.update(part for name, _ in model.named_modules() for part in name.split("."))
    return frozenset(names)


def _family_of(metadata: dict[str, str], keys: list[str]) -> type[Family]:
    """The family a file's kohya metadata names, or else the one its layer names show."""
    version = metadata.get("ss_base_model_version", "")
    for family in REGISTRY.values():
        if version and family.kohya_base_model_version == version:
            return family
    return family_of_lora(keys)


# ---- writing ---------------------------------------------------------------------------------------
def diffusers_twin(kohya_file: Path) -> Path:
    """Where the diffusers-layout copy of a kohya file goes: beside it, `<name>.diffusers.safetensors`."""
    return kohya_file.with_name(f"{kohya_file.stem}.diffusers.safetensors")


def write(result: Reshaped, target: str | Path) -> Reshaped:
    """Write the result in kohya's layout to `target` and in diffusers' to its twin, with metadata saying what was
    done."""
    target = Path(target).expanduser().resolve()
    if target.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{target.name}: LoRA files are written as .safetensors; give a name ending in that")
    lora = result.lora
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora.layers.items():
        state[f"{name}.lora_A.weight"] = layer.down.to(lora.dtype).contiguous()
        state[f"{name}.lora_B.weight"] = layer.up.to(lora.dtype).contiguous()
    configs = _scale_one_configs(lora)
    metadata = _metadata(lora, result.note, target.stem)
    save_kohya_lora(target, to_kohya(state, configs, lora.family), metadata)
    packed = {f"{component}.{key}": value for component, config in configs.items() for key, value in config.items()}
    twin = diffusers_twin(target)
    with atomic_path(twin) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed), **metadata})
    log.info("%s: written to %s and %s", result.note, target, twin)
    result.files = [target, twin]
    return result


def _scale_one_configs(lora: Lora) -> dict[str, dict]:
    """Each component's LoraConfig for layers whose alpha is their rank: the usual rank, and the others by name."""
    by_component: dict[str, dict[str, int]] = {}
    for name, layer in lora.layers.items():
        component, _, module = name.partition(".")
        # peft matches these against the loaded model, whose CLIP may lack the canonical names' first level.
        by_component.setdefault(component, {})[module.removeprefix(CANONICAL_TEXT_PREFIX)] = layer.rank
    configs = {}
    for component, ranks in by_component.items():
        usual = Counter(ranks.values()).most_common(1)[0][0]
        others = {module: rank for module, rank in ranks.items() if rank != usual}
        config = LoraConfig(
            r=usual, lora_alpha=usual, target_modules=sorted(ranks), rank_pattern=others, alpha_pattern=others
        ).to_dict()
        configs[component] = json.loads(json.dumps(config, default=sorted))  # sets as lists, as diffusers saves them
    return configs


def _metadata(lora: Lora, note: str, title: str) -> dict[str, str]:
    """The source's kohya metadata with the new rank, alpha, name and what was done; the old hashes dropped."""
    metadata = {key: value for key, value in lora.metadata.items() if not _STALE.match(key)}
    comment = metadata.get("ss_training_comment", "")
    description = metadata.get("modelspec.description", "")
    metadata.update(
        {
            "ss_output_name": title,
            "ss_network_module": metadata.get("ss_network_module", lora.family.kohya_network_module),
            "ss_base_model_version": metadata.get("ss_base_model_version", lora.family.kohya_base_model_version),
            "ss_network_dim": str(lora.rank),
            "ss_network_alpha": str(float(lora.rank)),
            "ss_training_comment": f"{note}; {comment}" if comment else note,
            "modelspec.title": title,
            "modelspec.description": f"{description} {note[:1].upper()}{note[1:]}.".strip(),
        }
    )
    return metadata
