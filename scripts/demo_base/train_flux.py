"""Train the tests' small pretrained Flux.1-shaped model on the demo's drawn scenes, on a CPU.

    python scripts/demo_base/train_flux.py --out /tmp/demo-flux --threads 2 --fp16

The demo model's VAE and CLIP text encoder stay as they are (its VAE gets a shift factor, as Flux's has, and both
factors are measured again on the scenes; CLIP is frozen: Flux reads only its pooled vector). A small T5 encoder and
a small Flux transformer (FluxTransformer2DModel: double and single blocks, 2x2 patches, rotary positions) learn
together, from scratch, on the rectified-flow objective, through the family's own `Flux1.predict`. It has no guidance
input, like Flux.1-schnell, so it is sampled with true classifier-free guidance (10 % of the captions are empty). T5
reads 32 tokens (its tokenizer's model_max_length), which the app uses for training, previews and Generate alike.
The folder loads with FluxPipeline.from_pretrained and is detected as Flux.1.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from train import draw_scenes, encode_all, lr_at, sample_timesteps, save_and_sample, timed_phases

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for lora_gui
from lora_gui import tiny
from lora_gui.demo import DEMO_MODEL
from lora_gui.families.flux import Flux1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-flux"), help="the diffusers folder to write")
    parser.add_argument("--grid", type=Path, default=None, help="the sample grid PNG (default: <out>-samples.png)")
    parser.add_argument("--base", type=Path, default=DEMO_MODEL, help="the folder whose VAE and CLIP it keeps")
    parser.add_argument("--size", type=int, default=64, help="picture side in pixels (latents are 1/8 of it)")
    parser.add_argument("--scenes", type=int, default=3000, help="how many scenes to draw and train on")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--double-blocks", type=int, default=2)
    parser.add_argument("--single-blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4, help="attention heads of 16 channels each")
    parser.add_argument("--text-width", type=int, default=64, help="T5's width")
    parser.add_argument("--text-tokens", type=int, default=32, help="the T5 tokens a caption is padded to")
    parser.add_argument("--drop-caption", type=float, default=0.1, help="share of empty captions, for guidance")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0, help="true classifier-free guidance of the samples")
    parser.add_argument("--fp16", action="store_true", help="save the transformer and VAE in fp16")
    return parser.parse_args()


def build_models(args: argparse.Namespace):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae", torch_dtype=torch.float32)
    clip_tokenizer = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    clip = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder", dtype=torch.float32)
    width = args.text_width
    t5_tokenizer, t5 = tiny.t5_text_parts(
        "tiny", max_length=args.text_tokens, d_model=width, d_ff=2 * width, num_heads=4, d_kv=width // 4
    )
    transformer = FluxTransformer2DModel(
        in_channels=4 * vae.config.latent_channels,  # 2x2 patches of latents
        num_layers=args.double_blocks,
        num_single_layers=args.single_blocks,
        attention_head_dim=16,
        num_attention_heads=args.heads,
        joint_attention_dim=width,
        pooled_projection_dim=clip.config.hidden_size,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # Flux.1-schnell's: no shift, at any size
    return vae, clip_tokenizer, clip, t5_tokenizer, t5, transformer, scheduler


def ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def pooled_texts(clip, clip_tokenizer, captions: list[str]) -> torch.Tensor:
    return torch.cat(
        [
            clip(ids(clip_tokenizer, captions[start : start + 256])).pooler_output
            for start in range(0, len(captions), 256)
        ]
    )


def train_transformer(transformer, t5, t5_ids, pooled, latents, stds, args) -> None:
    """Transformer and T5 together on the flow objective: noisy = (1 - sigma) x0 + sigma noise, target noise - x0."""
    params = [*transformer.parameters(), *t5.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 2)
    empty = len(latents)  # the last row of t5_ids and pooled: the empty caption
    transformer.train()
    t5.train()
    for step in range(args.steps):
        # batch: latents sampled from each picture's posterior, some captions dropped for guidance
        index = torch.randint(len(latents), (args.batch,), generator=generator)
        x0 = latents[index] + stds[index] * torch.randn(latents[index].shape, generator=generator) - args.shift
        x0 = x0 * args.scale
        text = torch.tensor([empty if rng.random() < args.drop_caption else int(row) for row in index])
        # forward: a point on the line from the picture to the noise, T5's states, the predicted velocity
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = (sample_timesteps(len(x0), 1000, generator) + 1).float() / 1000
        noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
        conditioning = {"prompt_embeds": t5(t5_ids[text])[0], "pooled_prompt_embeds": pooled[text]}
        prediction = Flux1.predict(transformer, noisy, sigmas * 1000, conditioning, [])
        loss = F.mse_loss(prediction, noise - x0)
        # backward, step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # log
        if step % 100 == 0 or step == args.steps - 1:
            print(f"  transformer step {step:5d}  loss {loss.item():.4f}", flush=True)
    transformer.eval()
    t5.eval()


def flux_samples(folder: Path, args: argparse.Namespace):
    """The saved folder loaded as any user would, drawing with true classifier-free guidance."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompts: list[str], generators: list[torch.Generator]):
        return pipe(
            prompts,
            negative_prompt=[""] * len(prompts),
            true_cfg_scale=args.guidance,
            height=args.size,
            width=args.size,
            num_inference_steps=args.sample_steps,
            max_sequence_length=args.text_tokens,
            generator=generators,
        ).images

    return draw


def main() -> None:
    from diffusers import FluxPipeline

    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    phase, times = timed_phases()
    vae, clip_tokenizer, clip, t5_tokenizer, t5, transformer, scheduler = build_models(args)
    sizes = {
        name: sum(p.numel() for p in part.parameters()) / 1e6
        for name, part in {"transformer": transformer, "T5": t5}.items()
    }
    print("parameters:", ", ".join(f"{name} {size:.2f} M" for name, size in sizes.items()), flush=True)

    pictures, captions = draw_scenes(args)
    means, stds = encode_all(vae, pictures)
    args.shift = float(means.mean())
    args.scale = float(1 / (means - args.shift).std())
    vae.register_to_config(shift_factor=args.shift, scaling_factor=args.scale)
    print(f"  latents: shift_factor {args.shift:.4f}, scaling_factor {args.scale:.4f}", flush=True)
    texts = [*captions, ""]
    t5_ids, pooled = ids(t5_tokenizer, texts), pooled_texts(clip, clip_tokenizer, texts)
    phase("draw and encode scenes")
    train_transformer(transformer, t5, t5_ids, pooled, means, stds, args)
    phase("train transformer + T5")

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    save_and_sample(pipe, transformer, args, phase, flux_samples)
    print(f"total {sum(times.values()):.0f} s", flush=True)


if __name__ == "__main__":
    main()
