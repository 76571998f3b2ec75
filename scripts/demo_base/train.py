"""Train the demo's small pretrained SD 1.5-shaped base model from scratch on drawn scenes, on a CPU.

    nice -n 19 python scripts/demo_base/train.py --out /tmp/demo-base --grid /tmp/demo-base.png

Phases: (1) draw the scenes; (2) train the VAE (AutoencoderKL, the real depth: latents 1/8 of the
picture) on reconstruction plus a small KL term; (3) encode every scene once; (4) train the UNet and
the CLIP text encoder together, from scratch, on the epsilon (or v-prediction) objective along SD's DDPM schedule;
(5) save a diffusers folder that StableDiffusionPipeline.from_pretrained loads; (6) render a grid of
samples with DPM-Solver. Each phase's wall time and the folder's size are printed.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for lora_gui
from scenes import captioned_scene, codec_picture

from lora_gui import tiny
from lora_gui.families.stable_diffusion import StableDiffusion1

PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background, on the left",
    "a green triangle on a white background, at the top",
    "a blue circle on a yellow background, on the right",
    "a white square on a green background, at the bottom",
    "a purple triangle on a gray background, in the center",
    "an orange circle on a white background, on the left",
    "a black triangle on a yellow background, on the right",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-base"), help="the diffusers folder to write")
    parser.add_argument("--grid", type=Path, default=None, help="the sample grid PNG (default: <out>-samples.png)")
    parser.add_argument("--size", type=int, default=64, help="picture side in pixels (latents are 1/8 of it)")
    parser.add_argument("--scenes", type=int, default=3000, help="how many scenes to draw and train on")
    parser.add_argument("--vae-from", type=Path, default=None, help="reuse the VAE of an earlier run's folder")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-widths", default="16,32,32,32", help="the VAE's four block widths")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl", type=float, default=1e-5, help="weight of the KL term beside the pixel MSE")
    parser.add_argument("--init-from", type=Path, default=None, help="start the UNet and text encoder from a folder")
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=32, help="the UNet's first block width (the second is twice)")
    parser.add_argument("--text-width", type=int, default=64, help="the text encoder's hidden size")
    parser.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        default="epsilon",
        help="what the UNet learns to predict: v_prediction makes the tests' v-prediction model (from the demo "
        "model, with --init-from and --vae-from)",
    )
    parser.add_argument("--drop-caption", type=float, default=0.1, help="share of empty captions, for guidance")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--fp16", action="store_true", help="save the UNet and VAE in fp16, as lora_gui/demo_model ships them"
    )
    return parser.parse_args()


def build_models(args: argparse.Namespace):
    """Tokenizer, text encoder, VAE, UNet, scheduler: SD 1.5's classes, small."""
    from diffusers import PNDMScheduler, UNet2DConditionModel

    # tiny.py's OpenAI-CLIP-shaped encoder (3 layers, 4 heads, quick-GELU: what tells SD 1.x from 2.x) and its
    # offline tokenizer, wider; its VAE's four blocks, one layer each.
    text_width = args.text_width
    (tokenizer,), (text_encoder,) = tiny.clip_text_parts(
        ("clip-l",), "tiny", hidden_size=text_width, intermediate_size=2 * text_width, projection_dim=text_width
    )
    vae = tiny.vae(
        "tiny",
        scaling_factor=0.18215,  # a placeholder: main() sets it from the encoded scenes
        block_out_channels=tuple(int(width) for width in args.vae_widths.split(",")),
        layers_per_block=1,
        # Groups of at least 4 channels: a group of one normalizes a flat colour away.
        norm_num_groups=4,
        sample_size=args.size,
    )
    width = args.width
    unet = UNet2DConditionModel(
        sample_size=args.size // 8,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=args.text_width,
        norm_num_groups=8,
    )
    scheduler = PNDMScheduler(
        **StableDiffusion1.noise_schedule,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        prediction_type=args.prediction_type,
    )
    return tokenizer, text_encoder, vae, unet, scheduler


def as_tensor(pictures: list[Image.Image]) -> torch.Tensor:
    """Pictures as one tensor in [-1, 1] (N, 3, size, size)."""
    array = np.stack([np.asarray(picture) for picture in pictures]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def draw_scenes(args: argparse.Namespace) -> tuple[torch.Tensor, list[str]]:
    """Every scene as a tensor and its caption."""
    scenes = [captioned_scene(args.seed * 1_000_003 + index, args.size) for index in range(args.scenes)]
    return as_tensor([picture for picture, _ in scenes]), [caption for _, caption in scenes]


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then a cosine down to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, pictures: torch.Tensor, args: argparse.Namespace) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    vae.train()
    for step in range(args.vae_steps):
        # batch
        batch = pictures[torch.randint(len(pictures), (args.vae_batch,), generator=generator)]
        # forward: the posterior, a sample of it, the reconstruction
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # loss: pixel MSE and L1 (sharper edges), and a small KL towards N(0, 1), per latent element
        mse = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + F.l1_loss(reconstruction, batch) + args.kl * kl
        # backward, step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        # log
        if step % 50 == 0 or step == args.vae_steps - 1:
            print(f"  vae step {step:5d}  mse {mse.item():.5f}  kl {kl.item():.3f}", flush=True)
    vae.eval()


@torch.no_grad()
def encode_all(vae, pictures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every picture's latent mean and standard deviation, unscaled."""
    means, stds = [], []
    for start in range(0, len(pictures), 128):
        dist = vae.encode(pictures[start : start + 128]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def save_reconstructions(vae, pictures: torch.Tensor, means: torch.Tensor, path: Path) -> None:
    """Scenes over their VAE reconstructions, to judge the VAE alone."""
    decoded = vae.decode(means).sample
    rows = [torch.cat(list(batch), dim=2) for batch in (pictures, decoded)]
    array = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def sample_timesteps(count: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """Half uniform, half drawn towards high noise (density 2t), where the caption decides the picture:
    the prompt is learnt sooner, and the low-noise steps that only sharpen edges still get their share."""
    uniform = torch.rand(count, generator=generator)
    skewed = torch.rand(count, generator=generator).sqrt()
    which = torch.rand(count, generator=generator) < 0.5
    return (torch.where(which, skewed, uniform) * total).long().clamp(0, total - 1)


def train_denoiser(unet, text_encoder, tokenizer, latents, stds, captions, args) -> None:
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(**StableDiffusion1.noise_schedule)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 2)
    token_ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    unet.train()
    text_encoder.train()
    for step in range(args.unet_steps):
        # batch: latents sampled from each picture's posterior, some captions dropped for guidance
        index = torch.randint(len(latents), (args.unet_batch,), generator=generator)
        x0 = (latents[index] + stds[index] * torch.randn(latents[index].shape, generator=generator)) * args.scale
        ids = token_ids.input_ids[index].clone()
        for row in range(len(ids)):
            if rng.random() < args.drop_caption:
                ids[row] = empty_ids
        # forward: noise at random timesteps, the text encoder's last hidden states, the predicted noise
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = sample_timesteps(len(x0), noise_schedule.config.num_train_timesteps, generator)
        noisy = noise_schedule.add_noise(x0, noise, timesteps)
        states = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
        # loss: against the noise (epsilon) or the velocity (v-prediction)
        target = noise_schedule.get_velocity(x0, noise, timesteps) if args.prediction_type == "v_prediction" else noise
        loss = F.mse_loss(prediction, target)
        # backward, step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # log
        if step % 100 == 0 or step == args.unet_steps - 1:
            print(f"  unet step {step:5d}  loss {loss.item():.4f}", flush=True)
    unet.eval()
    text_encoder.eval()


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def sample_grid(draw, grid_path: Path, size: int, seeds: int = 4) -> None:
    """`seeds` pictures per prompt, captioned, in one sheet; `draw(prompts, generators)` makes the pictures."""
    cell, label = 2 * size, 14
    sheet = Image.new("RGB", (seeds * cell, len(PROMPTS) * (cell + label)), "white")
    paint = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(PROMPTS):
        images = draw([prompt] * seeds, [torch.Generator().manual_seed(seed) for seed in range(seeds)])
        top = row * (cell + label)
        paint.text((2, top + 1), prompt, fill="black")
        for column, image in enumerate(images):
            sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (column * cell, top + label))
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(grid_path)


def sd_samples(folder: Path, args: argparse.Namespace):
    """The saved folder loaded as any user would, drawing with DPM-Solver."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompts: list[str], generators: list[torch.Generator]) -> list[Image.Image]:
        options = dict(num_inference_steps=args.sample_steps, guidance_scale=args.guidance, generator=generators)
        return pipe(prompts, height=args.size, width=args.size, **options).images

    return draw


def save_and_sample(pipe, denoiser, args: argparse.Namespace, phase, samples) -> None:
    """Save the folder, then draw the sample grid from it with `samples(folder, args)`. With --fp16 the denoiser and
    the VAE are saved in fp16, not the text encoders: diffusers loads fp16 weights in fp32 again when no torch_dtype
    is given, but transformers 5 keeps the dtype a file holds, and an fp16 text encoder feeds an fp32 denoiser half
    floats."""
    if args.fp16:
        denoiser.to(torch.float16)
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(args.out, safe_serialization=True)
    phase("save")
    print(f"folder {args.out}: {folder_size(args.out) / 1e6:.2f} MB", flush=True)
    grid = args.grid or args.out.with_name(args.out.name + "-samples.png")
    sample_grid(samples(args.out, args), grid, args.size)
    phase("sample grid")
    print(f"samples: {grid}", flush=True)


def timed_phases():
    """A function that prints how long the phase it names took, and the dict of those times."""
    clock = time.perf_counter()
    times: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = now - clock
        clock = now
        print(f"[{name}] {times[name]:.1f} s", flush=True)

    return phase, times


def main() -> None:
    from diffusers import StableDiffusionPipeline

    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    phase, times = timed_phases()
    tokenizer, text_encoder, vae, unet, scheduler = build_models(args)
    if args.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder")
    parts = {"vae": vae, "unet": unet, "text encoder": text_encoder}
    count = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    print("parameters:", ", ".join(f"{name} {n / 1e6:.2f} M" for name, n in count.items()), flush=True)

    pictures, captions = draw_scenes(args)
    phase("draw scenes")
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae")
    else:
        # The VAE learns from the scenes and as many pictures of any shape and colour: it is the model's codec.
        codec = as_tensor([codec_picture(args.seed * 1_000_003 + index, args.size) for index in range(args.scenes)])
        train_vae(vae, torch.cat([pictures, codec]), args)
    phase("train vae")
    means, stds = encode_all(vae, pictures)
    args.scale = float(1 / means.std())
    vae.register_to_config(scaling_factor=args.scale)
    print(f"  latent std {means.std().item():.3f} -> scaling_factor {args.scale:.4f}", flush=True)
    save_reconstructions(vae, pictures[:8], means[:8], args.out.with_name(args.out.name + "-vae.png"))
    phase("encode scenes")
    train_denoiser(unet, text_encoder, tokenizer, means, stds, captions, args)
    phase("train unet + text encoder")

    pipe = StableDiffusionPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_and_sample(pipe, unet, args, phase, sd_samples)
    print(f"total {sum(times.values()):.0f} s", flush=True)


if __name__ == "__main__":
    main()
