"""Florence-2, Microsoft's small vision-language model, as a captioner: sentences about a photo, short, detailed or
a paragraph long. It runs through transformers' own Florence-2 classes (no remote code), so its weights come from
the checkpoints converted to transformers' layout: `florence-community/Florence-2-base` and `-large`, the ones
transformers' documentation and tests load. `microsoft/Florence-2-*` still hold the remote-code layout, whose
tokenizer the native processor can't use.

`write_tiny` writes a random-weight Florence-2 in the same layout, which the tests load through the same code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from lora_gui.captioning import Captioner, CaptionerInfo, model_folder
from lora_gui.downloads import DownloadProgress, HubToken
from lora_gui.errors import ConfigError, LoraGuiError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from lora_gui.downloads import DownloadProgress, HubToken

# How much a caption says, and the task prompt that asks Florence-2 for it.
TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "more": "<MORE_DETAILED_CAPTION>"}
DEFAULT_DETAIL = "detailed"  # a sentence or three: what a LoRA's captions usually hold
NUM_BEAMS = 3  # as the model card generates: steadier captions than greedy decoding, for little more time
MAX_NEW_TOKENS = 256  # "more" writes a paragraph of about 100 tokens; this is room for it, not a target
BATCH_SIZE = 8  # pictures per generate call: fast on a GPU, and small enough for a CPU's memory
# The files its processor and model load: no README, no remote code, no other framework's weights.
_FILES = ["*.json", "*.txt", "*.safetensors"]


class Florence2(Captioner):
    """A loaded Florence-2: `caption` writes one caption per picture, batch by batch."""

    infos: ClassVar[tuple[CaptionerInfo, ...]] = (
        # Sizes are those of the fp16 safetensors plus the processor's files.
        CaptionerInfo(
            name="florence2-base",
            title="Florence-2 base: sentences, for photos",
            repo_id="florence-community/Florence-2-base",
            download_mb=470,
            writes="sentences",
        ),
        CaptionerInfo(
            name="florence2-large",
            title="Florence-2 large: sentences, for photos (slower, a little more accurate)",
            repo_id="florence-community/Florence-2-large",
            download_mb=1560,
            writes="sentences",
        ),
    )

    def __init__(self, model: Any, processor: Any, detail: str = DEFAULT_DETAIL, max_tokens: int = MAX_NEW_TOKENS):
        self.model = model  # a Florence2ForConditionalGeneration; None once closed
        self.processor = processor  # its Florence2Processor: prompts, pixels, decoding
        self.task = TASKS[detail]
        self.max_tokens = max_tokens
        self.runs_on = "the GPU" if model.device.type == "cuda" else "the CPU"  # for the user to read
        self._markup = _markup_pattern(processor.tokenizer)
        self._post_processes = _post_processes(processor, self.task)

    @classmethod
    def load(
        cls,
        info: CaptionerInfo,
        source: str | Path | None = None,
        device: str = "cpu",
        token: HubToken = None,
        on_progress: Callable[[DownloadProgress], None] | None = None,
        **options: object,
    ) -> Florence2:
        """`source`: a folder in transformers' layout, or the Hub id of another Florence-2 in it (a fine-tune).
        Options: `detail` ("short", "detailed" or "more") and `max_tokens` (the longest caption, in tokens)."""
        detail, max_tokens = _options(options)
        dtype = _dtype_for(device)
        folder, _ = model_folder(info, source, _FILES, "Florence-2", token, on_progress)
        model, processor = _load_folder(folder, dtype)
        return cls(model.to(device).eval(), processor, detail, max_tokens)

    def caption(self, images: list[Image.Image]) -> list[str]:
        if self.model is None:
            raise LoraGuiError("this captioner was closed: load it again to caption more pictures")
        captions: list[str] = []
        for start in range(0, len(images), BATCH_SIZE):
            captions += self._caption_batch(images[start : start + BATCH_SIZE])
        return captions

    def close(self) -> None:
        self.model = None
        self.processor = None
        from lora_gui import devices

        devices.free_memory()

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        import torch

        pictures = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        # Every picture gets the same task prompt, so the prompts need no padding.
        inputs = self.processor(text=[self.task] * len(pictures), images=pictures, return_tensors="pt")
        # The pixels in the model's precision (half the bytes to copy to a GPU); the token ids stay integers.
        inputs = inputs.to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, num_beams=NUM_BEAMS, max_new_tokens=self.max_tokens, do_sample=False)
        # Decoded with its special tokens, as the processor's own parsing expects.
        texts = self.processor.batch_decode(ids, skip_special_tokens=False)
        return [self._clean(text, picture.size) for text, picture in zip(texts, pictures, strict=True)]

    def _clean(self, text: str, size: tuple[int, int]) -> str:
        """The caption alone: the processor's parsing of the task's answer where its config has one, then any
        token that is markup rather than words (<s>, </s>, <pad>, <loc_…>) taken out and the spaces tidied."""
        if self._post_processes:
            text = self.processor.post_process_generation(text, task=self.task, image_size=size)[self.task]
        return " ".join(self._markup.sub(" ", text).split())


def _options(options: dict[str, object]) -> tuple[str, int]:
    """The options `load` takes, checked, with their defaults."""
    unknown = set(options) - {"detail", "max_tokens"}
    if unknown:
        raise ConfigError(f"Florence-2 has no setting {', '.join(sorted(unknown))}: it takes detail and max_tokens")
    detail = options.get("detail", DEFAULT_DETAIL)
    if detail not in TASKS:
        raise ConfigError(f"Florence-2's detail must be one of {', '.join(TASKS)} (got {detail!r})")
    max_tokens = options.get("max_tokens", MAX_NEW_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ConfigError(f"Florence-2's max_tokens must be a whole number of at least 1 (got {max_tokens!r})")
    return str(detail), max_tokens


def _dtype_for(device: str) -> torch.dtype:
    """On the GPU (`devices.card()`'s device) half precision, as the weights ship: bf16 where the card computes it
    (its wider range never overflows), else fp16. fp32 elsewhere: on the CPU half precision is slower, not faster."""
    import torch

    from lora_gui import devices

    gpu = devices.card()
    if gpu is None and torch.device(device).type == "cuda":
        raise ConfigError("there is no CUDA GPU on this computer: caption on the CPU instead (device 'cpu')")
    if gpu is None or torch.device(device).type != gpu.device.type:
        return torch.float32
    return torch.bfloat16 if gpu.bf16 else torch.float16


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from safetensors import SafetensorError
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    _check_layout(folder)
    try:
        processor = Florence2Processor.from_pretrained(folder)
        model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(
            f"could not load the Florence-2 model in {folder}: it looks damaged or incomplete ({first_line}). "
            "If it came from the Hub, delete its folder in the download cache and let it download again"
        ) from None
    return model, processor


def _check_layout(folder: Path) -> None:
    """A plain no to a folder that is no Florence-2 in transformers' layout, before loading it fails obscurely."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelLoadError(
            f"{folder} is not a Florence-2 model: it has no readable config.json (a Florence-2 folder holds "
            "config.json, model.safetensors and its processor's files, as florence-community/Florence-2-base does)"
        ) from None
    if "auto_map" in config:  # the original release's layout, which runs only its own code from the Hub
        raise ModelLoadError(
            f"{folder} holds Florence-2 in its original remote-code layout, which transformers' own Florence-2 "
            "can't load: use one converted to transformers' layout, such as florence-community/Florence-2-base"
        )
    if config.get("model_type") != "florence2":
        raise ModelLoadError(f"{folder} is not a Florence-2 model (its config.json says {config.get('model_type')!r})")


def _markup_pattern(tokenizer: Any) -> re.Pattern[str]:
    """A pattern for the tokens that are markup, never words of a caption: the special ones (<s>, </s>, <pad>,
    <image>), the ones Florence-2 added for its other tasks (<loc_…>, <od>, <ocr>…) and the task prompts."""
    tokens = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab(), *TASKS.values()}
    markup = sorted((token for token in tokens if token.startswith("<") and token.endswith(">")), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, markup)))


def _post_processes(processor: Any, task: str) -> bool:
    """Whether the processor's config knows how to parse this task's answer: the converted checkpoints' does; a
    processor saved without `post_processor_config` refuses every task, and cleaning alone does then."""
    try:
        processor.post_process_generation("", task=task, image_size=(1, 1))
    except ValueError:
        return False
    return True


# ---- a tiny random-weight Florence-2, for the tests ----------------------------------------------------
# Words the tiny tokenizer knows whole: those of Florence-2's task prompts and a few a caption uses. Anything else
# is spelled out byte by byte, as byte-level BPE does with any word it has no merges for.
_TINY_WORDS = """
what does the image describe in detail is shown with a paragraph locate objects text of and on at photo picture
shows man woman person dog cat car tree sky red green blue white black sitting standing wearing background
""".split()
# Tokens the real tokenizer adds for Florence-2's other tasks (a few of each kind), markup that must never reach a
# caption, and the image placeholder the processor repeats once per image feature.
_TINY_ADDED = ["<od>", "</od>", "<ocr>", "</ocr>", "<cap>", "</cap>", "<dcap>", "</dcap>", "<ncap>", "</ncap>"]
_TINY_ADDED += [f"<loc_{index}>" for index in range(8)]
_TINY_IMAGE_SIZE = 64  # pixels a side (the real model sees 768): the vision encoder's 32x reduction leaves 2x2
# The spread of the random weights: ten times the real initialisation's, or the picture's few features hardly move
# the tiny decoder and every picture gets the same caption.
_TINY_INIT = 0.2
# The converted checkpoints' processor config: how each kind of task's answer is parsed (its long list of words
# never grounded, shortened here).
_POST_PROCESSOR_CONFIG = {
    "ocr": {"pattern": r"(.+?)" + r"<loc_(\d+)>" * 8, "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": ["it", "the image", "image", "the", "a", "an"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """Write a random-weight Florence-2 (about 1 MB) in transformers' layout, which `Florence2.load(info,
    source=folder)` loads as it loads the real ones: the real architecture (a four-stage DaViT vision encoder, a
    BART encoder-decoder) at tiny widths, a byte-level BPE tokenizer built here, and the processor's configs."""
    from transformers import Florence2Processor

    folder = Path(folder)
    tokenizer = _tiny_tokenizer()
    model = _tiny_model(len(tokenizer), tokenizer.image_token_id, seed)
    processor = Florence2Processor(
        image_processor=_tiny_image_processor(_image_tokens(model)),
        tokenizer=tokenizer,
        post_processor_config=_POST_PROCESSOR_CONFIG,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _tiny_tokenizer() -> Any:
    """BART's tokenizer (byte-level BPE, as Florence-2's) over a small vocabulary: BART's special tokens at their
    ids, the 256 byte symbols, whole words (with and without the leading space symbol Ġ), the added tokens."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import BartTokenizer

    vocab = ["<s>", "<pad>", "</s>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    known, merges = set(vocab), []

    def add(left: str, right: str) -> None:
        if left + right not in known:
            known.add(left + right)
            vocab.append(left + right)
            merges.append((left, right))

    words = [spelling for word in _TINY_WORDS for spelling in (word, word.capitalize())]
    # Each word letter by letter first, then with its leading space: BPE applies merges in this order, so a word
    # after a space becomes one token too.
    for word in words:
        for end in range(1, len(word)):
            add(word[:end], word[end])
    for word in words:
        add("Ġ", word)
    vocab.append("<mask>")  # last, as in BART's vocabulary
    tokenizer = BartTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        merges=merges,
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=1024,
    )
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in _TINY_ADDED])
    return tokenizer


def _tiny_model(vocab_size: int, image_token_id: int, seed: int) -> Any:
    import torch
    from transformers import Florence2Config, Florence2ForConditionalGeneration, GenerationConfig

    text = dict(
        model_type="bart",
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=MAX_NEW_TOKENS + 64,  # the decoder's longest caption, and the prompt with the image
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        init_std=_TINY_INIT,
    )
    # The real model's four stages (patch strides 4, 2, 2, 2) at tiny widths, one block each (its third has nine).
    vision = dict(
        embed_dim=[8, 16, 32, 64],
        num_heads=[1, 2, 4, 8],
        num_groups=[1, 2, 4, 8],
        depths=[1, 1, 1, 1],
        window_size=4,
        projection_dim=32,
        initializer_range=_TINY_INIT,
    )
    torch.manual_seed(seed)
    config = Florence2Config(
        text_config=text, vision_config=vision, image_token_id=image_token_id, initializer_range=_TINY_INIT
    )
    model = Florence2ForConditionalGeneration(config).eval()
    # As the converted checkpoints generate: the answer starts with <s> and ends with </s>.
    model.generation_config = GenerationConfig(
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        no_repeat_ngram_size=3,
        num_beams=NUM_BEAMS,
        early_stopping=True,
    )
    return model


def _image_tokens(model: Any) -> int:
    """How many features the vision encoder gives a picture: the prompt holds that many image placeholders."""
    import torch

    pixels = torch.zeros(1, 3, _TINY_IMAGE_SIZE, _TINY_IMAGE_SIZE)
    with torch.inference_mode():
        return model.get_image_features(pixels).pooler_output.shape[1]


def _tiny_image_processor(image_tokens: int) -> Any:
    """CLIP's image processor set as the real Florence-2's: squashed to a square (no crop), ImageNet's mean and
    spread, bicubic (CLIP's default)."""
    from transformers import CLIPImageProcessor

    square = {"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE}
    processor = CLIPImageProcessor(
        size=square,
        crop_size=square,
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.image_seq_length = image_tokens
    return processor
