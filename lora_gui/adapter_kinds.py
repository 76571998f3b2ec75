"""The kinds of adapter a run trains (TrainConfig.lora_type), one entry each: what the code knows about a kind.

peft builds each from its config class and arguments (adapters.lora_config); kohya's layout writes and reads its
tensors by their names (lora_files/kohya_layout.py); the metadata names its LyCORIS network (lora_files/metadata.py);
a file from elsewhere is told to be one by its tensor names (lora_files/detect.py). Adding a kind is one entry here,
plus its weight change in kohya_layout where its maths differs. No torch or peft here: config.py takes its choices
from this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AdapterKind:
    name: str  # TrainConfig.lora_type
    title: str
    lycoris: bool  # one of LyCORIS' own kinds (not a LoRA)
    help: str  # what it is, for the setting's help
    peft_class: str  # peft's config class for it
    alpha_argument: str  # that class's name for alpha
    peft_arguments: dict[str, Any]  # its other arguments, besides the rank, alpha and target modules
    # Regular expressions for the tensor names of one layer: as peft names them (a diffusers-layout file), and
    # the suffixes a kohya-layout file may hold (LyCORIS' names, as ComfyUI's comfy/weight_adapter/ reads them).
    peft_parts: tuple[str, ...]
    file_parts: tuple[str, ...]
    # LyCORIS' kohya network arguments (lycoris/kohya.py) that make it; None: kohya's own LoRA network.
    lycoris_args: dict[str, str] | None = None
    # A tensor-name ending by which a file from elsewhere is told to be this kind, which Generate applies as weight
    # changes; None: diffusers applies it, told by the file's layout.
    marker: str | None = None
    # peft's LoHa and LoKr read the base weight's shape, which NF4's packed bytes don't have.
    trains_on_nf4: bool = True

    @property
    def long_title(self) -> str:
        """As the LoRA's metadata and a detected file's layout name it."""
        return f"LyCORIS {self.title}" if self.lycoris else self.title

    @property
    def menu_title(self) -> str:
        return f"{self.title} (LyCORIS)" if self.lycoris else self.title


_LORA_PEFT = (r"lora_A\.weight", r"lora_B\.weight")
_LORA_FILE = (r"lora_down\.weight", r"lora_up\.weight", *_LORA_PEFT, "alpha")

ADAPTER_KINDS = {
    kind.name: kind
    for kind in (
        AdapterKind(
            "lora",
            "LoRA",
            lycoris=False,
            help="the usual",
            peft_class="LoraConfig",
            alpha_argument="lora_alpha",
            peft_arguments={"init_lora_weights": "gaussian", "use_dora": False},
            peft_parts=_LORA_PEFT,
            file_parts=_LORA_FILE,
        ),
        AdapterKind(
            "dora",
            "DoRA",
            lycoris=False,
            help="also learns each weight's size: often better at the same rank, slower",
            peft_class="LoraConfig",
            alpha_argument="lora_alpha",
            peft_arguments={"init_lora_weights": "gaussian", "use_dora": True},
            peft_parts=(*_LORA_PEFT, "lora_magnitude_vector"),
            file_parts=(*_LORA_FILE, "dora_scale", "lora_magnitude_vector"),
            lycoris_args={"algo": "lora", "dora_wd": "True", "wd_on_output": "True"},  # peft's lengths: output rows'
            marker=r"\.(dora_scale|lora_magnitude_vector)",
        ),
        AdapterKind(
            "loha",
            "LoHa",
            lycoris=True,
            help="LyCORIS' Hadamard product: more capacity for the file size",
            peft_class="LoHaConfig",
            alpha_argument="alpha",
            peft_arguments={},
            peft_parts=(r"hada_w[12]_[ab]",),
            file_parts=(r"hada_w[12]_[ab]", r"hada_t[12]", "alpha"),
            lycoris_args={"algo": "loha"},
            marker=r"\.hada_w1_a",
            trains_on_nf4=False,
        ),
        AdapterKind(
            "lokr",
            "LoKr",
            lycoris=True,
            help="LyCORIS' Kronecker product: more capacity for the file size",
            peft_class="LoKrConfig",
            alpha_argument="alpha",
            peft_arguments={},
            peft_parts=(r"lokr_w[12](?:_[ab])?",),
            file_parts=(r"lokr_w[12](?:_[ab])?", "lokr_t2", "alpha"),
            lycoris_args={"algo": "lokr", "factor": "-1"},  # peft's LoKrConfig's decompose_factor
            marker=r"\.lokr_w[12](_[ab])?",
            trains_on_nf4=False,
        ),
    )
}


def any_of(parts: Iterable[str]) -> str:
    """One regular expression alternative for the given parts, each once, in their order."""
    return "|".join(dict.fromkeys(parts))


def titles() -> str:
    """The kinds' titles as a sentence names them: "LoRA, DoRA, LoHa or LoKr"."""
    names = [kind.title for kind in ADAPTER_KINDS.values()]
    return f"{', '.join(names[:-1])} or {names[-1]}"
