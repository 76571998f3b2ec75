"""`python -m lora_gui bench`: our training step against the reference script's, side by side.

Both loops run in this one process, on the same model folder, images, batch size, resolution,
rank and precision:

- reference: what the family's diffusers example script does each step, with the images already
  decoded and transformed in memory, so its data loading costs it nothing. For SD 1.5 and SDXL,
  examples/text_to_image/train_text_to_image_lora.py (VAE encode, text encode, UNet forward and
  backward, AdamW on fp32 LoRA weights, `.item()` on the loss every step, a clip call that clips
  nothing); for Flux.1, examples/dreambooth/train_dreambooth_lora_flux.py with a caption per picture
  (CLIP and T5 encode every batch's captions, VAE encode, rectified flow, transformer forward and
  backward, real clipping, AdamW, `.item()` on the loss); for Z-Image, its train_dreambooth_lora_z_image.py, the
  same step with every caption encoded once before the loop;
- ours: the engine's real `train()` with its defaults.

Full-size models (`--model sd15|sdxl|flux`) are the real architectures with random weights, which cost
the same to run as trained ones and need no download. `flux-shallow` is Flux.1 at its full width with
1/19 of its depth, which a CPU holds: its blocks cost what the real model's do, one by one; `zimage-shallow`
likewise keeps 4 of Z-Image's 34 blocks.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lora_gui import devices, events
from lora_gui.adapters import lora_config
from lora_gui.base_models import load_pipeline
from lora_gui.batching import fit_to_bucket, image_to_tensor
from lora_gui.cache import latent_shape
from lora_gui.config import TrainConfig, load_preset
from lora_gui.data import open_image, scan_folder
from lora_gui.demo import write_demo_dataset
from lora_gui.families import Family, ImageGeometry, bench_models, get_family
from lora_gui.tiny import write_tiny_model
from lora_gui.training import train

log = logging.getLogger(__name__)

MODELS = bench_models()

# The AdamW weight decay diffusers' DreamBooth LoRA scripts (Flux.1's, Z-Image's, Flux.2's) default to.
DREAMBOOTH_WEIGHT_DECAY = 1e-4


@dataclass
class LoopResult:
    name: str
    steps_per_second: float
    images_per_second: float
    peak_memory_gb: float
    first_step_seconds: float
    step_tflop: float | None = None
    mfu: float | None = None


@dataclass
class Setup:
    model_dir: Path
    data_dir: Path
    batch_size: int
    resolution: int
    rank: int
    precision: str  # resolved: "no", "fp16" or "bf16"
    steps: int
    warmup: int
    preset: str = ""  # ours trains with this preset's settings (the reference has no such knobs)
    ours: dict = field(default_factory=dict)  # and these settings on top

    def config(self) -> TrainConfig:
        base = load_preset(self.preset) if self.preset else TrainConfig()
        return base.replace(**self.ours).replace(
            base_model=str(self.model_dir),
            data=str(self.data_dir),
            resolution=self.resolution,
            batch_size=self.batch_size,
            rank=self.rank,
            mixed_precision=self.precision,
            max_steps=self.warmup + self.steps,
            epochs=0,
            sample_every=0,
            sample_steps=1,  # the final previews' peak memory counts, and one step reaches it; their time is untimed
            checkpoint_every=0,
        )


# ---- memory -------------------------------------------------------------------------------------
def _reset_peak_memory() -> None:
    if devices.has_cuda():
        devices.reset_peak_memory()
        return
    gc.collect()
    try:  # hand freed heap back to the OS, then restart the peak-RSS counter (Linux)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.warning("peak RSS can't be reset here; CPU memory figures include earlier work")


def _peak_memory_gb() -> float:
    if devices.has_cuda():
        return devices.peak_gpu_memory_gb()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _sync() -> None:
    if devices.has_cuda():
        torch.cuda.synchronize()


# ---- the two loops ------------------------------------------------------------------------------
def reference_loop(setup: Setup) -> LoopResult:
    """train_text_to_image_lora.py's per-step work (SD 1.5, SDXL), with its data already in memory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    _reset_peak_memory()
    started = time.perf_counter()
    accelerator = Accelerator(cpu=not devices.has_cuda(), mixed_precision=setup.precision)
    weight_dtype = devices.DTYPES[accelerator.mixed_precision]
    family, pipe = load_pipeline(str(setup.model_dir), dtype=weight_dtype)
    pipe.vae.to(weight_dtype)  # the reference keeps its VAE in the weight dtype too
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encoders = family.text_encoders(pipe)
    for module in (pipe.unet, pipe.vae, *encoders):
        module.requires_grad_(False)
        module.to(accelerator.device)
    pipe.unet.add_adapter(lora_config(setup.rank, setup.rank, family.reference_targets))
    cast_training_params(pipe.unet, dtype=torch.float32)
    lora_layers = filter(lambda p: p.requires_grad, pipe.unet.parameters())
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(pipe.unet, optimizer, lr_scheduler)

    pixels, token_ids, geometry = _images_in_memory(setup, family, pipe)

    timings = []
    for step in range(setup.warmup + setup.steps):
        rows = _rows(setup, step, len(pixels))
        with accelerator.accumulate(unet):
            batch = pixels[rows].to(accelerator.device, dtype=weight_dtype)
            latents = family.latents_for_denoiser(pipe.vae, pipe.vae.encode(batch).latent_dist.sample())
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(rows),), device=latents.device
            )
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            conditioning = family.encode(encoders, [ids[rows] for ids in token_ids], accelerator.device)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            kwargs = family.unet_kwargs(conditioning, [geometry[r] for r in rows], accelerator.device)
            prediction = unet(noisy, timesteps, **kwargs, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
            accelerator.gather(loss.repeat(len(rows))).mean().item()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(lora_layers, 1.0)  # a spent filter: clips nothing, as in the script
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        _sync()
        timings.append(time.perf_counter())
    result = _result("reference", timings, started, setup)
    del unet, optimizer, pipe, pixels
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def flow_reference_loop(setup: Setup, captions_cached: bool = False) -> LoopResult:
    """The per-step work of diffusers' DreamBooth LoRA scripts for rectified-flow transformers (Flux.1's, Z-Image's,
    Flux.2 klein's: one shape of step) for a LoRA on the transformer's layers the script adapts by default
    (`Family.reference_targets`), with a caption per picture, with its data already in memory. `captions_cached`:
    the script encodes every picture's caption once, before its loop (Z-Image's, Flux.2 klein's), instead of every
    step's anew (Flux.1's)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    _reset_peak_memory()
    started = time.perf_counter()
    accelerator = Accelerator(cpu=not devices.has_cuda(), mixed_precision=setup.precision)
    weight_dtype = devices.DTYPES[accelerator.mixed_precision]
    family, pipe = load_pipeline(str(setup.model_dir), dtype=weight_dtype)
    pipe.vae.to(weight_dtype)  # the script keeps every part in the weight dtype
    for module in (pipe.transformer, pipe.vae, *family.text_encoders(pipe)):
        module.requires_grad_(False)
        module.to(accelerator.device)
    pipe.transformer.add_adapter(lora_config(setup.rank, setup.rank, family.reference_targets))
    if accelerator.mixed_precision == "fp16":  # the script upcasts the LoRA for fp16 only: in bf16 it trains in bf16
        cast_training_params(pipe.transformer, dtype=torch.float32)
    lora_parameters = [parameter for parameter in pipe.transformer.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=DREAMBOOTH_WEIGHT_DECAY, eps=1e-8
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    transformer, optimizer, lr_scheduler = accelerator.prepare(pipe.transformer, optimizer, lr_scheduler)
    pixels, token_ids, geometry = _images_in_memory(setup, family, pipe)
    script_step = FlowScriptStep(pipe, family, transformer, accelerator.device, weight_dtype, geometry)
    cached = script_step.encode_captions(token_ids) if captions_cached else None

    timings = []
    for step in range(setup.warmup + setup.steps):
        rows = _rows(setup, step, len(pixels))
        text = {key: value[rows] for key, value in cached.items()} if cached else None
        with accelerator.accumulate(transformer):
            loss = script_step.loss(pixels[rows], [ids[rows] for ids in token_ids], text)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(transformer.parameters(), 1.0)  # a fresh generator: this one clips
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        loss.detach().item()
        _sync()
        timings.append(time.perf_counter())
    result = _result("reference", timings, started, setup)
    del transformer, optimizer, pipe, pixels, script_step
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


@dataclass
class FlowScriptStep:
    """The loss of one batch as the rectified-flow DreamBooth scripts compute it, phase by phase."""

    pipe: DiffusionPipeline
    family: type[Family]
    transformer: torch.nn.Module  # as accelerate prepared it
    device: torch.device
    dtype: torch.dtype
    geometry: list[ImageGeometry]

    def loss(
        self, pixels: torch.Tensor, token_ids: list[torch.Tensor], text: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        text = text if text is not None else self.encode_captions(token_ids)
        latents = self.encode_pictures(pixels)
        noise = torch.randn_like(latents)
        timesteps, sigmas = self.draw_timesteps(len(latents))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = self.family.predict(self.transformer, noisy, timesteps, text, self.geometry[: len(latents)])
        weighting = compute_loss_weighting_for_sd3("none", sigmas)  # its default scheme: every picture weighs 1
        errors = weighting.float() * (prediction.float() - (noise - latents).float()) ** 2
        return errors.reshape(len(latents), -1).mean(1).mean()

    def encode_captions(self, token_ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Captions that differ from picture to picture are encoded anew every step."""
        with torch.no_grad():
            return self.family.encode(self.family.text_encoders(self.pipe), token_ids, self.device)

    def encode_pictures(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = self.family.latent_distribution(vae, pixels.to(self.device, dtype=vae.dtype)).sample()
        return self.family.latents_for_denoiser(vae, latents).to(self.dtype)

    def draw_timesteps(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform timesteps (the default weighting scheme, "none"), and their sigmas looked up one
        `.item()` (a GPU sync) at a time, as the script does."""
        schedule = self.pipe.scheduler
        drawn = compute_density_for_timestep_sampling("none", count)
        timesteps = schedule.timesteps[(drawn * schedule.config.num_train_timesteps).long()].to(self.device)
        schedule_timesteps = schedule.timesteps.to(self.device)
        indices = [(schedule_timesteps == timestep).nonzero().item() for timestep in timesteps]
        sigmas = schedule.sigmas.to(self.device, dtype=self.dtype)[indices]
        return timesteps, sigmas.view(-1, 1, 1, 1)


# The diffusers example script a family names (Family.reference_script) -> its step, as the loop above repeats it.
REFERENCE_LOOPS = {
    "train_text_to_image_lora.py": reference_loop,
    "train_dreambooth_lora_flux.py": flow_reference_loop,
    # These encode each picture's caption once, before their loop (`precompute_latents` with custom prompts).
    "train_dreambooth_lora_flux2_klein.py": functools.partial(flow_reference_loop, captions_cached=True),
    "train_dreambooth_lora_flux2.py": functools.partial(flow_reference_loop, captions_cached=True),
    "train_dreambooth_lora_z_image.py": functools.partial(flow_reference_loop, captions_cached=True),
    "train_dreambooth_lora_qwen_image.py": functools.partial(flow_reference_loop, captions_cached=True),
}


def _rows(setup: Setup, step: int, count: int) -> list[int]:
    """The pictures of a step's batch: the next ones in order, round and round."""
    return [(step * setup.batch_size + i) % count for i in range(setup.batch_size)]


def _images_in_memory(
    setup: Setup, family: type[Family], pipe: DiffusionPipeline
) -> tuple[torch.Tensor, list[torch.Tensor], list[ImageGeometry]]:
    """The reference's data, decoded and transformed beforehand so that loading costs it nothing:
    every picture as pixels, every caption as token ids, and each picture's geometry."""
    examples = scan_folder(setup.data_dir).examples
    fitted = [fit_to_bucket(open_image(e.path), (setup.resolution, setup.resolution)) for e in examples]
    pixels = torch.stack([image_to_tensor(image) for image, _ in fitted])
    return pixels, family.tokenize(pipe, [e.caption for e in examples]), [g for _, g in fitted]


def ours_loop(setup: Setup, run_dir: Path) -> LoopResult:
    """The engine's real training run; steps are timed by its own step events."""
    _reset_peak_memory()
    started = time.perf_counter()
    timings: list[float] = []

    def on_event(event: events.Event) -> None:
        if event.kind == events.STEP:
            timings.append(time.perf_counter())  # emitted right after the loss sync, so the step is done

    train(setup.config(), run_dir, on_event=on_event)
    return _result("ours", timings, started, setup)


def _result(name: str, timings: list[float], started: float, setup: Setup) -> LoopResult:
    measured = timings[setup.warmup - 1 :] if setup.warmup else [started, *timings]
    seconds = measured[-1] - measured[0]
    steps_per_second = (len(measured) - 1) / seconds
    return LoopResult(
        name=name,
        steps_per_second=steps_per_second,
        images_per_second=steps_per_second * setup.batch_size,
        peak_memory_gb=_peak_memory_gb(),
        first_step_seconds=timings[0] - started,
    )


# ---- FLOPs and utilisation (GPU) ----------------------------------------------------------------
def step_tflop(setup: Setup) -> float:
    """FLOPs of our step (one denoiser forward and backward with the LoRA), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    family, pipe = load_pipeline(str(setup.model_dir), dtype=devices.DTYPES[setup.precision])
    device = torch.device("cuda" if devices.has_cuda() else "cpu")
    denoiser = family.denoiser(pipe)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(lora_config(setup.rank, setup.rank, family.default_target_modules))
    denoiser.to(device)
    encoders = family.text_encoders(pipe)
    for encoder in encoders:
        encoder.to(device)
    channels, factor = latent_shape(pipe.vae)
    side = setup.resolution // factor
    latents = torch.randn(setup.batch_size, channels, side, side, device=device, dtype=denoiser.dtype)
    with torch.no_grad():
        conditioning = family.encode(encoders, family.tokenize(pipe, ["a photo"] * setup.batch_size), device)
    size = (setup.resolution, setup.resolution)
    geometry = [ImageGeometry(size, (0, 0), size)] * setup.batch_size
    timesteps = torch.randint(0, 1000, (setup.batch_size,), device=device)
    counter = FlopCounterMode(display=False)
    with counter, devices.autocast(device, setup.precision):
        family.predict(denoiser, latents, timesteps, conditioning, geometry).float().pow(2).mean().backward()
    del pipe, denoiser
    return counter.get_total_flops() / 1e12


# ---- the whole benchmark ------------------------------------------------------------------------
def model_folder(workdir: Path, model: str) -> Path:
    """The benchmark's model (a key of MODELS) in `workdir`, written there the first time."""
    family, size, _ = MODELS[model]
    folder = workdir / f"model-{model}"
    if not (folder / "model_index.json").is_file():
        log.info("Writing a random-weight %s model to %s", model, folder)
        write_tiny_model(folder, family, size=size)
    return folder


def run_bench(
    model: str = "tiny",
    steps: int = 20,
    warmup: int = 5,
    batch_size: int = 2,
    resolution: int | None = None,
    rank: int = 16,
    precision: str = "auto",
    images: int = 8,
    workdir: Path | None = None,
    preset: str = "",
    ours: dict | None = None,
    repeat: int = 1,
) -> tuple[LoopResult, LoopResult, dict]:
    """Time both loops `repeat` times in turn (reference, ours, reference, ...) and return the pair
    whose ratio is the median, with every pair's ratio in the info: on a shared machine whose speed
    drifts, pairs taken close together compare fairly where two long single runs may not."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lora-bench-"))
    model_dir = model_folder(workdir, model)
    resolution = resolution or MODELS[model][2]
    data_dir = write_demo_dataset(workdir / f"images-{resolution}", count=images, size=(resolution, resolution))
    setup = Setup(
        model_dir,
        data_dir,
        batch_size,
        resolution,
        rank,
        devices.resolve_precision(precision),
        steps,
        warmup,
        preset,
        ours or {},
    )
    # TF32 is a process-wide switch that training turns on: on for both loops from the start, so the first
    # pair compares like the others (the reference script's --allow_tf32).
    devices.use_tensor_cores()
    reference_of_family = REFERENCE_LOOPS[get_family(MODELS[model][0]).reference_script]
    pairs = []
    for _ in range(repeat):
        reference = reference_of_family(setup)
        pairs.append((reference, ours_loop(setup, Path(tempfile.mkdtemp(prefix="run-", dir=workdir)))))
    ratios = [ours.steps_per_second / reference.steps_per_second for reference, ours in pairs]
    reference, ours = pairs[sorted(range(repeat), key=ratios.__getitem__)[(repeat - 1) // 2]]
    machine = {**_machine(), "ratios": ratios}
    if devices.has_cuda():
        flops, ceiling = step_tflop(setup), devices.matmul_tflops()
        machine["half_precision_matmul_tflops"] = round(ceiling, 1)
        for result in (reference, ours):
            result.step_tflop = flops
            result.mfu = flops * result.steps_per_second / ceiling
    return reference, ours, {**machine, **asdict(setup), "model": model}


def _machine() -> dict:
    device = torch.cuda.get_device_name() if devices.has_cuda() else f"CPU: {_cpu_name()}"
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(reference: LoopResult, ours: LoopResult, info: dict) -> str:
    lines = [
        f"model {info['model']} at {info['resolution']} px, batch {info['batch_size']}, rank {info['rank']}, "
        f"precision {info['precision']}, {info['steps']} timed steps after {info['warmup']} warm-up; {info['device']}"
        + (f"; ours with preset {info['preset']}" if info["preset"] else "")
        + (f"; ours with {info['ours']}" if info["ours"] else ""),
        "",
        f"| {'loop':10} | steps/s | images/s | peak memory GB | first step s | model FLOPs utilisation |",
        f"|{'-' * 12}|---------|----------|----------------|--------------|-------------------------|",
    ]
    for result in (reference, ours):
        mfu = "n/a (GPU only)" if result.mfu is None else f"{result.mfu:.1%}"
        lines.append(
            f"| {result.name:10} | {_rate(result.steps_per_second):>7} | {_rate(result.images_per_second):>8} | "
            f"{result.peak_memory_gb:14.2f} | {result.first_step_seconds:12.1f} | {mfu:23} |"
        )
    memory_note = (
        "most GPU memory held (PyTorch's reserved peak, plus the CUDA context and libraries)"
        if devices.has_cuda()
        else "peak RSS of the process"
    )
    lines.append("")
    if len(info["ratios"]) > 1:
        lines.append(
            f"the pair with the median ratio of {len(info['ratios'])}, run in turn; every pair's ratio: "
            + ", ".join(f"{ratio:.2f}" for ratio in info["ratios"])
        )
    lines += [
        f"peak memory is the {memory_note} during each loop",
        f"ours/reference steps/s: {ours.steps_per_second / reference.steps_per_second:.2f}; "
        f"peak memory ours/reference: {ours.peak_memory_gb / reference.peak_memory_gb:.2f}",
    ]
    return "\n".join(lines)


def _rate(value: float) -> str:
    """Three significant digits, so a full-size model's 0.0741 steps/s on a CPU isn't shown as 0.07."""
    return f"{value:.2f}" if value >= 10 else f"{value:.3g}"


def save_json(path: Path, reference: LoopResult, ours: LoopResult, info: dict) -> None:
    clean = {key: (str(value) if isinstance(value, Path) else value) for key, value in info.items()}
    payload = {"setup": clean, "reference": asdict(reference), "ours": asdict(ours)}
    path.write_text(
        json.dumps(payload, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    )
