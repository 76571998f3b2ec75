"""Random-weight pipelines in diffusers format: tiny ones for tests and the offline demo, full-size
ones (the real architectures) for speed measurements, and shallow ones (the real widths, a few of the
real depth's blocks) for speed measurements of a model too big for the machine.

They have the real architectures' shape (same block types, attention names, scheduler configs,
a real CLIP byte-pair tokenizer built from a small vocabulary) at a size that trains on a CPU in
seconds, and they load through the same `from_pretrained` path as a real model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_gui.atomic import atomic_folder

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

# Four blocks of two layers in both sizes, like the real VAE: latents are 1/8 of the image, buckets work
# the same way, and encoding an image costs about as much beside a UNet step as in the real model
# (0.58 of its FLOPs for the tiny SD 1.5, 0.65 for the real one), so speed ratios on tiny models mean something.
_VAES = {
    "tiny": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=8, sample_size=128),
    "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
}


# Video VAEs whose pictures are one frame (Qwen-Image's, Wan 2.1's architecture): the real one's depth (three
# downsamplings: latents 1/8 of the picture) at a few channels.
_VIDEO_VAES = {
    "AutoencoderKLQwenImage": {"tiny": dict(base_dim=4, num_res_blocks=1), "full": {}},
}


def clip_text_parts(kinds: tuple[str, ...], size: str, **config: Any) -> tuple[list, list]:
    """Tokenizers and random-weight CLIP text encoders of these kinds (keys of _TEXT_ENCODERS), in order; `config`
    sets CLIPTextConfig fields that differ from the table's (the demo base's wider encoder)."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        # OpenAI CLIP's tokenizer pads with the end token; OpenCLIP's (SD 2, SDXL's second) with "!".
        tokenizers = [_tokenizer(Path(tmp), "<|endoftext|>" if kind == "clip-l" else "!") for kind in kinds]
    return tokenizers, [_text_encoder(kind, size, vocab_size, config) for kind in kinds]


def _whole(size: str) -> str:
    """The size of the parts a shallow model keeps whole: CLIP and the VAE are small beside its denoiser and T5."""
    return "full" if size == "shallow" else size


def _text_encoder(kind: str, size: str, vocab_size: int, changes: dict[str, Any]):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, mlp, layers, heads, act, projection = _TEXT_ENCODERS[kind][_whole(size)]
    values = dict(
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
    config = CLIPTextConfig(**{**values, **changes})
    # SDXL's second encoder gives the UNet its projected pooled output too.
    return (CLIPTextModelWithProjection if kind == "openclip-g" else CLIPTextModel)(config)


def vae(size: str, vae_class: str = "AutoencoderKL", **config: Any):
    """A random-weight VAE of the real one's depth (see _VAES), of this diffusers class; `config` sets what a family's
    VAE changes (Flux.1's has 16 latent channels, a shift factor and no quant convolutions; Flux.2's is its own class,
    AutoencoderKLFlux2, with 32 channels and a batch norm in place of a scaling factor)."""
    import diffusers

    if vae_class in _VIDEO_VAES:  # a video VAE's shape in its own terms, its latents' mean and std its defaults
        return getattr(diffusers, vae_class)(**{**_VIDEO_VAES[vae_class][_whole(size)], **config})
    return getattr(diffusers, vae_class)(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **{**_VAES[_whole(size)], **config},
    )


# T5 v1.1 encoders by size: (model width, MLP width, layers, heads, head width). "full" is T5-XXL, Flux.1's;
# "shallow" one of its 24 layers, as the shallow Flux keeps one of its transformer's 19 double blocks.
_T5 = {"tiny": (32, 64, 2, 4, 8), "shallow": (4096, 10240, 1, 64, 64), "full": (4096, 10240, 24, 64, 64)}


def t5_text_parts(size: str, max_length: int = 512, **config: Any) -> tuple:
    """A T5 tokenizer built here from the tiny vocabulary (SentencePiece's unigram model, with no download)
    and a random-weight T5 encoder of that size; `config` sets T5Config fields that differ from the table's
    (the Flux demo model's wider encoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    # Whole words first, then single letters, so any word can still be spelled out.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("▁" + word, -1.0) for word in _WORDS)]
    pieces += [("▁", -2.0), *((char, -3.0) for char in sorted({char for word in _WORDS for char in word}))]
    model = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=model,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )
    width, mlp, layers, heads, head_width = _T5[size]
    values = dict(
        vocab_size=len(pieces) if size == "tiny" else 32128,
        d_model=width,
        d_ff=mlp,
        d_kv=head_width,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8 if size == "tiny" else 32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return tokenizer, T5EncoderModel(T5Config(**{**values, **config}))


# Qwen3 language models as text encoders (Z-Image's and Flux.2 klein 4B's: Qwen3-4B; klein 9B's: Qwen3-8B), by size:
# (width, MLP width, layers, heads, key-value heads, head width). The tiny ones keep 28 layers (narrow ones cost
# nothing) so the pipelines read the hidden states they read from the real ones (Flux.2 klein stacks layers 9, 18
# and 27); the shallow ones the full width with 4 of the 36 layers.
_QWEN3 = {
    "qwen3-4b": {
        "tiny": (32, 64, 28, 2, 1, 16),
        "shallow": (2560, 9728, 4, 32, 8, 128),
        "full": (2560, 9728, 36, 32, 8, 128),
    },
    "qwen3-8b": {
        "tiny": (32, 64, 28, 2, 1, 16),
        "shallow": (4096, 12288, 4, 32, 8, 128),
        "full": (4096, 12288, 36, 32, 8, 128),
    },
}
QWEN3_VOCAB = 151936  # the published tokenizer's embedding rows
# Qwen3's chat template for what the pipelines send (one user message, then the assistant's turn); with
# enable_thinking=False it closes an empty thinking block, as Qwen3's own template does.
_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def _byte_level_bpe(words: list[str], special_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer (tokenizers') whose merges are learned from the words, alone and after a space, as
    Qwen's and Mistral's were learned from their corpora: every word becomes one token, and anything else is still
    spelled out byte by byte. The special tokens come first, whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    model.train_from_iterator([" ".join(words), *words], trainer)
    return model


def qwen_tokenizer(max_length: int, words: tuple[str, ...] = ()):
    """A Qwen2 byte-level BPE tokenizer built here from the tiny vocabulary and `words` (no download), with Qwen3's
    special tokens and chat template: the pipelines call `apply_chat_template`, then tokenize the text it makes."""
    from transformers import Qwen2Tokenizer

    learned = json.loads(_byte_level_bpe([*_WORDS, *words]).to_str())["model"]
    vocab = sorted(learned["vocab"], key=learned["vocab"].get)
    tokenizer = Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate([*vocab, *_QWEN_SPECIAL])},
        merges=[tuple(merge) if isinstance(merge, list) else tuple(merge.split()) for merge in learned["merges"]],
        model_max_length=max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIAL[1:])})
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def qwen3_text_parts(kind: str, size: str, max_length: int = 512) -> tuple:
    """A Qwen tokenizer (`qwen_tokenizer`) and a random-weight Qwen3 language model of this kind and size (keys of
    _QWEN3); a family that reads the bare model takes its `.model`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer(max_length)
    width, mlp, layers, heads, kv_heads, head_width = _QWEN3[kind][size]
    config = Qwen3Config(
        vocab_size=len(tokenizer) if size == "tiny" else QWEN3_VOCAB,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_width,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=kind == "qwen3-4b",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    return tokenizer, Qwen3ForCausalLM(config)


# Qwen2.5-VL-7B-Instruct (Qwen-Image's text encoder) by size: its language model's (width, MLP width, layers, heads,
# key-value heads); "shallow" the full width with 4 of its 28 layers. Its vision tower, which reads no text, is as
# small as it can be but in the full model.
_QWEN25_VL = {"tiny": (32, 64, 2, 2, 1), "shallow": (3584, 18944, 4, 28, 4), "full": (3584, 18944, 28, 28, 4)}
QWEN25_VL_VOCAB = 152064
# The words of the instruction Qwen-Image's pipeline puts before every caption, known whole, so the tiny tokenizer
# spells the instruction in 34 tokens as Qwen's own does: the pipeline drops those 34.
_QWEN_IMAGE_INSTRUCTION = (
    "system user assistant Describe image by detailing color shape size texture quantity text spatial relationships "
    "objects background"
).split()


def qwen25_vl_text_parts(size: str, max_length: int = 512) -> tuple:
    """A Qwen tokenizer (`qwen_tokenizer`, which also knows the instruction's words) and a random-weight
    Qwen2.5-VL of this size (Qwen2_5_VLForConditionalGeneration, as the pipeline loads it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer(max_length, tuple(_QWEN_IMAGE_INSTRUCTION))
    width, mlp, layers, heads, kv_heads = _QWEN25_VL[size]
    head_width = width // heads
    vision = {} if size == "full" else dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer) if size == "tiny" else QWEN25_VL_VOCAB,
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            # Its multimodal RoPE: the head's frequencies shared among time, height and width as the published 16/24/24.
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=_mrope_section(head_width)),
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        ),
        vision_config=dict(**vision, out_hidden_size=width),
        tie_word_embeddings=False,
    )
    return tokenizer, Qwen2_5_VLForConditionalGeneration(config)


def _mrope_section(head_width: int) -> list[int]:
    """The published split of a head's 64 frequency pairs (16, 24, 24), for a head of this width."""
    pairs = head_width // 2
    time = pairs // 4
    return [time, (pairs - time) // 2, pairs - time - (pairs - time) // 2]


# Mistral-Small-3.x-24B (Mistral3ForConditionalGeneration), Flux.2 dev's text encoder, by size: its language model's
# (width, MLP width, layers, heads, key-value heads, head width) and its Pixtral vision tower's (width, MLP width,
# layers, heads, head width). The tiny one keeps 30 layers, so the pipeline reads the hidden states it reads from the
# real one's 40 (10, 20 and 30); the shallow one the full width with 4 of them. Only the full one has the published
# vision tower: no caption's encoding runs it.
_MISTRAL3 = {
    "tiny": ((32, 64, 30, 2, 1, 16), (16, 32, 1, 2, 8)),
    "shallow": ((5120, 32768, 4, 32, 8, 128), (16, 32, 1, 2, 8)),
    "full": ((5120, 32768, 40, 32, 8, 128), (1024, 4096, 24, 16, 64)),
}
MISTRAL3_VOCAB = 131072  # the published tokenizer's (Tekken's) embedding rows
# Mistral's special tokens, and its chat template for what Flux.2 dev's pipeline sends: a system message and a user
# message, each as one text part, without a generation prompt.
_MISTRAL_SPECIAL = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- set text = message['content'] if message['content'] is string else message['content'][0]['text'] %}"
    "{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{{ '[INST]' + text + '[/INST]' }}{%- endif %}"
    "{%- endfor %}"
)


def mistral_tokenizer(max_length: int, words: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer built here from the tiny vocabulary and `words` (Flux.2 dev's system message, which
    precedes every caption), with Mistral's special tokens and chat template. The published model's PixtralProcessor
    wraps such a tokenizer with an image processor that needs torchvision; the pipeline only calls its
    `apply_chat_template`, which the tokenizer has too. It pads on the right: the published one is said to pad on the
    left (which nothing here depends on: the pipeline's own call reads either), but the tiny transformer then reads
    mostly the padding's hidden states, and a few steps' LoRA changes its pictures too little to be seen."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe([*_WORDS, *words], _MISTRAL_SPECIAL),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )


def mistral3_text_parts(size: str, max_length: int = 512, words: tuple[str, ...] = ()) -> tuple:
    """A Mistral tokenizer (`mistral_tokenizer`) and a random-weight Mistral3ForConditionalGeneration of this size
    (keys of _MISTRAL3)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tokenizer = mistral_tokenizer(max_length, words)
    (width, mlp, layers, heads, kv_heads, head_width), vision = _MISTRAL3[size]
    text = MistralConfig(
        vocab_size=len(tokenizer) if size == "tiny" else MISTRAL3_VOCAB,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_width,
        max_position_embeddings=131072,
        rope_theta=1_000_000_000.0,
        rms_norm_eps=1e-5,
        sliding_window=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_width, vision_mlp, vision_layers, vision_heads, vision_head_width = vision
    pixtral = PixtralVisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_mlp,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        head_dim=vision_head_width,
        patch_size=14,
        image_size=1540 if size == "full" else 28,
    )
    config = Mistral3Config(
        text_config=text,
        vision_config=pixtral,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        tie_word_embeddings=False,  # the published one has its own output layer
    )
    return tokenizer, Mistral3ForConditionalGeneration(config)


def build_pipeline(family: str, size: str = "tiny", seed: int = 0):
    """A random-weight pipeline of the given family and size ("tiny", "shallow", or "full" = the real shapes): the
    parts the family names made here, then assembled by the family."""
    from lora_gui.families import REGISTRY

    if family not in REGISTRY:
        raise ValueError(f"family must be one of {', '.join(REGISTRY)}")
    kind = REGISTRY[family]
    torch.manual_seed(seed)
    # The CLIP encoders first, then the others (T5, Qwen, Mistral), as Flux.1's pipeline holds them; made in this
    # order, from one seed.
    clips = tuple(encoder for encoder in kind.random_text_encoders if encoder in _TEXT_ENCODERS)
    tokenizers, text_encoders = clip_text_parts(clips, size)
    for encoder in kind.random_text_encoders:
        if encoder in _TEXT_ENCODERS:
            continue
        if encoder == "t5":
            tokenizer, model = t5_text_parts(size)
        elif encoder in _QWEN3:
            tokenizer, model = qwen3_text_parts(encoder, size)
        elif encoder == "qwen2.5-vl-7b":
            tokenizer, model = qwen25_vl_text_parts(size)
        elif encoder == "mistral3-24b":
            tokenizer, model = mistral3_text_parts(size, words=kind.tokenizer_words)
        else:
            raise ValueError(f"no random text encoder of the kind {encoder!r}")
        tokenizers.append(tokenizer)
        text_encoders.append(model)
    return kind.random_pipeline(size, tokenizers, text_encoders, vae(size, **kind.random_vae))


def write_tiny_model(folder: str | Path, family: str, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight pipeline folder that `DiffusionPipeline.from_pretrained(folder)` loads.

    Those for speed measurements are stored in fp16, as published checkpoints are."""
    folder = Path(folder)
    pipe = build_pipeline(family, size, seed)
    if size != "tiny":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def ensure_tiny_model(folder: str | Path, family: str) -> Path:
    """The tiny model in `folder`, written the first time it is asked for.

    It is written beside the folder and renamed into place, so a half-written model is never used,
    and when two callers race the loser's copy is simply dropped.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    try:
        with atomic_folder(folder, replace=False) as tmp:
            write_tiny_model(tmp, family)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
    return folder
