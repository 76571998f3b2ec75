"""A training run for `accelerate launch` with two processes, as tests/test_gpu_regime.py starts it (a script, not
a module the tests import).

Every process writes its own copy of the LoRA (rank-N.safetensors) when the run ends, so the test
can compare them; and only the last process is asked to stop, once the checkpoint of --stop-after
exists, the way Ctrl+C may reach one process of a launched run before the others.

usage: two_ranks.py CONFIG_JSON RUN_DIR --stop-after STEP
"""

from __future__ import annotations

import argparse
from pathlib import Path

from accelerate import PartialState

from lora_gui.config import TrainConfig
from lora_gui.lora_files.diffusers_layout import save_diffusers_lora
from lora_gui.runs import RunFolder
from lora_gui.training import loop, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--stop-after", type=int, required=True)
    args = parser.parse_args()
    state = PartialState(cpu=True)
    save_lora = loop.save_lora

    def save_on_every_process(training, step):
        rank = training.accelerator.process_index
        save_diffusers_lora(training.run.path / f"rank-{rank}.safetensors", training.pipe, training.family)
        return save_lora(training, step)

    loop.save_lora = save_on_every_process
    checkpoint = RunFolder(Path(args.run_dir)).checkpoint(args.stop_after)

    def should_stop() -> bool:
        return state.process_index == state.num_processes - 1 and checkpoint.is_dir()

    train(TrainConfig.load(args.config), args.run_dir, should_stop=should_stop)


if __name__ == "__main__":
    main()
