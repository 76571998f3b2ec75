"""Random-weight pipelines in diffusers format: tiny ones for tests and the offline demo, full-size
ones (the real architectures) for speed measurements.

They have the real architectures' shape (same block types, attention names, scheduler configs,
a real CLIP byte-pair tokenizer built from a small vocabulary) at a size that trains on a CPU in
seconds, and they load through the same `from_pretrained` path as a real Stable Diffusion model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

TINY_FAMILIES = ("sd15", "sd2", "sdxl")

# Words the tokenizer knows whole; anything else is spelled out byte by byte, as CLIP would.
_WORDS = """
a an the of in on with and at by for to from photo picture painting drawing portrait close up
person man woman boy girl child face hair eyes smile dog cat bird horse car house tree flower sky
sea beach mountain city street room table chair cup book red green blue yellow black white orange
purple pink brown gray gold silver bright dark light shadow sunset night day style art anime sketch
watercolor oil digital detailed simple background standing sitting looking wearing shirt dress hat
glasses square circle triangle stripes dots pattern toy object shiny old new small big tiny cute
sks ohwx zwx lora
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def write_tokenizer_files(folder: Path) -> int:
    """Write vocab.json and merges.txt of a small CLIP BPE vocabulary; return its size."""
    base = list(_bytes_to_unicode().values())
    vocab = base + [char + "</w>" for char in base]
    merges: list[str] = []
    known = set(vocab)
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
                merges.append(merge)
            pieces = [merged, *pieces[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


def _tokenizer(vocab_dir: Path, pad_token: str):
    from transformers import CLIPTokenizer

    # Without model_max_length, truncation to the model's 77 tokens raises OverflowError.
    return CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77, pad_token=pad_token)


# Text encoders by kind: (hidden size, MLP size, layers, heads, activation, projection) per size.
# "full" is the published architecture (OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14).
_TEXT_ENCODERS = {
    "clip-l": {"tiny": (32, 64, 3, 4, "quick_gelu", 32), "full": (768, 3072, 12, 12, "quick_gelu", 768)},
    "openclip-h": {"tiny": (48, 96, 3, 4, "gelu", 32), "full": (1024, 4096, 23, 16, "gelu", 1024)},
    "openclip-g": {"tiny": (32, 64, 3, 4, "gelu", 32), "full": (1280, 5120, 32, 20, "gelu", 1280)},
}
_FAMILY_TEXT_ENCODERS = {"sd15": ("clip-l",), "sd2": ("openclip-h",), "sdxl": ("clip-l", "openclip-g")}

# UNets per family and size. UNet2DConditionModel's own defaults are SD 1.x's, so "full" lists changes only.
_UNETS = {
    ("sd15", "tiny"): dict(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
    ("sd15", "full"): dict(sample_size=64, cross_attention_dim=768),
    ("sd2", "tiny"): dict(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=48,
        use_linear_projection=True,
        norm_num_groups=8,
    ),
    ("sd2", "full"): dict(
        sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
    ),
    ("sdxl", "tiny"): dict(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        use_linear_projection=True,
        norm_num_groups=8,
    ),
    ("sdxl", "full"): dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256,
        use_linear_projection=True,
    ),
}

# Four blocks of two layers in both sizes, like the real VAE: latents are 1/8 of the image, buckets work
# the same way, and encoding an image costs about as much beside a UNet step as in the real model
# (0.58 of its FLOPs for the tiny SD 1.5, 0.65 for the real one), so speed ratios on tiny models mean something.
_VAES = {
    "tiny": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=8, sample_size=128),
    "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
}


def _text_encoder(kind: str, size: str, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, mlp, layers, heads, act, projection = _TEXT_ENCODERS[kind][size]
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    # SDXL's second encoder gives the UNet its projected pooled output too.
    return (CLIPTextModelWithProjection if kind == "openclip-g" else CLIPTextModel)(config)


def _vae(family: str, size: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
        **_VAES[size],
    )


def _scheduler(family: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    if family == "sd2":  # the 768 px SD 2 models predict velocity
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    if family == "sdxl":
        return EulerDiscreteScheduler(**common, prediction_type="epsilon")
    return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon")


def build_pipeline(family: str = "sd15", size: str = "tiny", seed: int = 0):
    """A random-weight pipeline of the given family and size ("tiny", or "full" = the real shapes)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}")
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        # OpenAI CLIP's tokenizer pads with the end token; OpenCLIP's (SD 2, SDXL's second) with "!".
        tokenizers = [
            _tokenizer(Path(tmp), "<|endoftext|>" if kind == "clip-l" else "!")
            for kind in _FAMILY_TEXT_ENCODERS[family]
        ]
    torch.manual_seed(seed)
    text_encoders = [_text_encoder(kind, size, vocab_size) for kind in _FAMILY_TEXT_ENCODERS[family]]
    parts = dict(
        vae=_vae(family, size), unet=UNet2DConditionModel(**_UNETS[family, size]), scheduler=_scheduler(family)
    )
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            force_zeros_for_empty_prompt=True,
            **parts,
        )
    return StableDiffusionPipeline(
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **parts,
    )


def write_tiny_model(folder: str | Path, family: str = "sd15", seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight pipeline folder that `DiffusionPipeline.from_pretrained(folder)` loads.

    Full-size ones (for speed measurements) are stored in fp16, as published checkpoints are."""
    folder = Path(folder)
    pipe = build_pipeline(family, size, seed)
    if size == "full":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def ensure_tiny_model(folder: str | Path, family: str = "sd15") -> Path:
    """The tiny model in `folder`, written the first time it is asked for.

    It is written beside the folder and renamed into place, so a half-written model is never used,
    and when two callers race the loser's copy is simply dropped.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_tiny_model(tmp, family)
        tmp.replace(folder)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
