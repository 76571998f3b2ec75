"""A run folder: where everything a run produces lives, so nothing lives only in memory.

runs/<name>/
  config.json  dataset/  checkpoints/step-N/  samples/  metrics.jsonl  train.log
  pytorch_lora_weights.safetensors      (diffusers: pipeline.load_lora_weights(run_dir))
  <name>.safetensors                    (kohya layout: AUTOMATIC1111, Forge, ComfyUI)
  lora_info.json                        (how far training went: the LoRA files' metadata is rebuilt from it)
  README.md                             (the model card, as the Hugging Face Hub shows it)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_gui.files import write_text_atomic

DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
# The layouts a run's LoRA is written in: kohya's (<name>.safetensors) and diffusers' (DIFFUSERS_LORA).
LORA_LAYOUTS = ("kohya", "diffusers", "both")
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser().resolve())

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def dataset(self) -> Path:
        return self.path / "dataset"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def diffusers_lora(self) -> Path:
        return self.path / DIFFUSERS_LORA

    @property
    def kohya_lora(self) -> Path:
        """`<run name>.safetensors`, the name A1111 and ComfyUI list it under."""
        path = self.path / f"{self.name}.safetensors"
        return path.with_name(f"{self.name}-kohya.safetensors") if path.name == DIFFUSERS_LORA else path

    @property
    def lora_info(self) -> Path:
        return self.path / "lora_info.json"

    @property
    def model_card(self) -> Path:
        return self.path / "README.md"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first. A half-written one (a crash mid-save) has no state file."""
        found = []
        if self.checkpoints.is_dir():
            for folder in self.checkpoints.glob("step-*"):
                if folder.is_dir() and (folder / TRAINER_STATE).is_file() and folder.name[5:].isdigit():
                    found.append((int(folder.name[5:]), folder))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        checkpoints = self.list_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def prune_checkpoints(self, keep: int) -> None:
        for _, folder in self.list_checkpoints()[:-keep]:
            shutil.rmtree(folder, ignore_errors=True)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Drop lines logged after `last_step`: a resumed run redoes those steps."""
        rows = [row for row in self.read_metrics() if row.get("step", 0) <= last_step]
        write_text_atomic(self.metrics, "".join(json.dumps(row) + "\n" for row in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
