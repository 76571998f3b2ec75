"""Small random-weight pipelines in diffusers format, for tests and the offline demo.

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


def _text_config(vocab_size: int, hidden_size: int, projection_dim: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks, so the VAE downsamples by 8 like the real one and buckets work the same way.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
    )


def _scheduler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    common = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    if prediction_type == "v_prediction":
        from diffusers import DDIMScheduler

        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    if prediction_type == "sdxl":
        return EulerDiscreteScheduler(**common, prediction_type="epsilon")
    return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False, prediction_type=prediction_type)


def build_tiny_pipeline(family: str = "sd15", seed: int = 0):
    """A random-weight pipeline of the given family, the same for the same seed."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}")
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        # SD 1.x pads with the end token; SD 2 and SDXL's second encoder pad with "!" (OpenCLIP).
        tokenizer = _tokenizer(Path(tmp), "<|endoftext|>" if family == "sd15" else "!")
        tokenizer_2 = _tokenizer(Path(tmp), "!") if family == "sdxl" else None

    torch.manual_seed(seed)
    if family == "sdxl":
        text_encoder = CLIPTextModel(_text_config(vocab_size, 32, 32))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, 32, 32, act="gelu"))
        unet = UNet2DConditionModel(
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
        )
        return StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_scheduler("sdxl"),
            force_zeros_for_empty_prompt=True,
        )

    sd2 = family == "sd2"
    text_encoder = CLIPTextModel(_text_config(vocab_size, 48 if sd2 else 32, 32, act="gelu" if sd2 else "quick_gelu"))
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8,
        cross_attention_dim=48 if sd2 else 32,
        use_linear_projection=sd2,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler("v_prediction" if sd2 else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_model(folder: str | Path, family: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny pipeline folder that `DiffusionPipeline.from_pretrained(folder)` loads."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
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
