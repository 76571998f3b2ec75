"""The dataset doctor: what in a folder of pictures and captions will make a LoRA worse, and how to fix it.

It adds to the checks the staged dataset already shows (`staging.DatasetReport`: unreadable files, exact
copies, pictures smaller than the training resolution, missing captions) what those can't see: pictures
that are nearly the same, blurry ones, extreme shapes and how the pictures spread over the aspect-ratio
buckets, captions that are all the same, miss the trigger word, spell it differently or run past what the
text encoder reads, and a set too small or too large; of an edit LoRA's pairs, those that show no change, differ in
shape or miss a partner. Each finding is one plain sentence naming the files
and the fix, with the id of a one-click fix (`apply_fix`) where there is one.

It reads headers and one small thumbnail per picture (a JPEG is decoded at 1/2, 1/4 or 1/8 scale; PNG and
WebP can only be decoded whole), remembered per file, so a second look at hundreds of pictures is instant.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from lora_gui import batching, data
from lora_gui.errors import DataError
from lora_gui.staging import DatasetReport, Staging

# How many pictures a LoRA usually trains well on: a person or an object, and a style.
SUBJECT_PICTURES = (10, 50)
STYLE_PICTURES = (20, 200)
# Two pictures whose 64-bit perceptual hashes differ in at most this many bits look alike in grey; they are
# near-duplicates when their small colour thumbnails also differ by at most NEAR_COLOUR_DIFFERENCE (0-255,
# on average), so a red and a blue circle on the same background are not.
NEAR_DUPLICATE_BITS = 6
NEAR_COLOUR_DIFFERENCE = 12.0
# Blurry: sharpness below this share of the set's median, judged only with at least BLUR_MIN_PICTURES.
BLUR_FRACTION = 0.4
BLUR_MIN_PICTURES = 4
# An edit pair whose two pictures have the same perceptual hash and colour thumbnails this close (0-255, on average)
# shows no change: a small logo put on a mug moves the thumbnail further than that.
PAIR_UNCHANGED_DIFFERENCE = 1.0
# Longer than this (long side : short side) is more than cropping to a bucket can save.
EXTREME_ASPECT = 2.5
# Bucket sides are multiples of a step that depends on the loaded model (Family.bucket_step needs its
# config); 64 px is real Stable Diffusion's, and the shapes it gives are those of the finer steps of SDXL
# and Flux to within a step, which is enough to show how the pictures spread.
BUCKET_STEP = 64
THUMBNAIL_SIDE = 256  # the side the sharpness is measured at
_HASH_SIDE, _HASH_BITS_SIDE, _COLOUR_SIDE = 32, 8, 8
_NAMED_AT_MOST = 5

Severity = Literal["warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One thing that will make the LoRA worse (a warning), or worth knowing (info)."""

    kind: str  # "near-duplicate", "too-small", "blurry", "aspect-ratio", "buckets", "caption-empty", ...
    files: tuple[str, ...]  # relative paths, the one to keep first for a near-duplicate
    message: str  # one plain sentence naming the files and the fix
    # "keep-first", "remove", "remove-before", "add-trigger", "match-trigger"; None: only a person can
    fix: str | None = None
    severity: Severity = "warning"


# ---- what a thumbnail says -----------------------------------------------------------------------
@dataclass(frozen=True)
class Look:
    """What one small decoding of a picture tells: enough to compare it with others, and its sharpness."""

    phash: int  # 64-bit perceptual hash of the grey picture
    colours: bytes  # an 8x8 RGB thumbnail
    sharpness: float | None  # None: too flat to tell


def _dct_matrix(side: int) -> np.ndarray:
    k = np.arange(side)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * side))


_DCT = _dct_matrix(_HASH_SIDE)


def _look(path: Path) -> Look | None:
    try:
        image = data.open_image(path, draft_side=THUMBNAIL_SIDE)
    except (data.UnusableImage, OSError):
        return None  # the header checks say why, or training will
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    grey = image.convert("L")
    return Look(
        phash=perceptual_hash(grey),
        colours=image.resize((_COLOUR_SIDE, _COLOUR_SIDE), Image.Resampling.BOX).tobytes(),
        sharpness=sharpness(grey),
    )


_looks = data.PerFile(_look)


def perceptual_hash(grey: Image.Image) -> int:
    """The DCT hash: which of a 32x32 picture's 8x8 lowest frequencies are above their median. Resaving,
    resizing and small colour changes keep it; different pictures differ in about half its 64 bits."""
    pixels = np.asarray(grey.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:_HASH_BITS_SIDE, :_HASH_BITS_SIDE].ravel()
    bits = low > np.median(low[1:])  # the first is the mean brightness, which would skew the median
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _laplacian_variance(pixels: np.ndarray) -> float:
    laplacian = pixels[1:-1, :-2] + pixels[1:-1, 2:] + pixels[:-2, 1:-1] + pixels[2:, 1:-1] - 4 * pixels[1:-1, 1:-1]
    return float(laplacian.var()) if laplacian.size else 0.0


def sharpness(grey: Image.Image) -> float | None:
    """The variance of the Laplacian at this size over that at half the size.

    The Laplacian's variance alone grows with how much there is in the picture (a busy street beats a face
    on a plain wall); this ratio is about the same for any sharp picture, however much it shows, and falls
    when edges are soft, since halving the size sharpens a blurred edge but not a sharp one."""
    half = grey.resize((max(1, grey.width // 2), max(1, grey.height // 2)), Image.Resampling.BOX)
    coarse = _laplacian_variance(np.asarray(half, dtype=np.float64))
    if coarse < 1.0:
        return None  # a flat picture has no edges to judge
    return _laplacian_variance(np.asarray(grey, dtype=np.float64)) / coarse


# ---- tokens -----------------------------------------------------------------------------------
# CLIP's own split (its byte-pair encoding then cuts rare words into more pieces): words, single digits, runs
# of punctuation. tiny.py's tokenizers have the real formats but a vocabulary of about 150 words, and spell
# every other word byte by byte, so they would count real captions several times too long: the doctor counts
# with a real tokenizer when the download cache holds one (never downloading it), else with this rule.
_CLIP_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def approximate_tokens(caption: str) -> int:
    """About how many CLIP tokens a caption is: one a word, digit or run of punctuation, with start and end."""
    return len(_CLIP_WORDS.findall(caption)) + 2


@dataclass(frozen=True)
class _Reader:
    limit: int  # tokens the text encoder reads
    tokenizer: Any = None  # a real one from the download cache; None: counted approximately

    def count(self, caption: str) -> int:
        if self.tokenizer is None:
            return approximate_tokens(caption)
        return len(self.tokenizer.tokenize(caption)) + self.tokenizer.num_special_tokens_to_add()


@functools.cache
def _reader(family: str | None) -> _Reader:
    """How far the family's text encoder reads, and its tokenizer if the download cache holds it."""
    from huggingface_hub import try_to_load_from_cache

    from lora_gui.families import REGISTRY, get_family

    families = [get_family(family)] if family else list(REGISTRY.values())
    # Of a family not given, the shortest any family reads: a caption longer than that may be cut.
    limit = min(each.prompt_tokens for each in families)
    for each in families:
        for subfolder in each.tokenizer_names:
            for repo in each.hub_models:
                config = try_to_load_from_cache(repo, f"{subfolder}/tokenizer_config.json")
                if not isinstance(config, str):
                    continue
                try:
                    if json.loads(Path(config).read_text(encoding="utf-8")).get("model_max_length") != limit:
                        break  # another text encoder of this family
                    from transformers import AutoTokenizer

                    # From the cached folder itself: by the repo's name, transformers looks for a config.json
                    # that a diffusers model doesn't have at its top.
                    tokenizer = AutoTokenizer.from_pretrained(Path(config).parent)
                except Exception:  # a cache half there or of another version: count approximately instead
                    continue
                return _Reader(limit, tokenizer)
    return _Reader(limit)


# ---- the checks --------------------------------------------------------------------------------
def diagnose(
    folder: Path,
    resolution: int,
    family: str | None = None,
    trigger: str = "",
    default_caption: str = "",
    control_data: str | Path = "",
) -> list[Finding]:
    """Everything worth fixing in a folder of pictures before training at `resolution`: warnings first. An edit
    LoRA's before pictures are the staging folder's, or those in `control_data`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():  # before Staging, which would make it
        raise DataError(f"the image folder {folder} does not exist; check the path")
    report = Staging(folder).check(resolution, default_caption, control_data)
    examples = report.usable
    looks = {example.relpath: _looks(example.path) for example in examples}
    findings = [
        *_count(len(examples)),
        *_pairs(report),
        *_near_duplicates(examples, looks, report.duplicates),
        *_too_small(report.too_small, examples, resolution),
        *_blurry(looks),
        *_extreme_shapes(examples, resolution),
        *_captions(examples, report.uncaptioned, default_caption, report.paired),
        *_trigger(examples, trigger.strip()),
        *_too_long(examples, trigger, None if family in (None, "auto") else family),
        *_buckets(examples, resolution),
    ]
    return sorted(findings, key=lambda finding: finding.severity != "warning")


def _names(files: list[str] | tuple[str, ...]) -> str:
    shown = list(files[:_NAMED_AT_MOST])
    more = len(files) - len(shown)
    if more:
        return f"{', '.join(shown)} and {more} more"
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"


def _count(pictures: int) -> list[Finding]:
    (subject_least, subject_most), (style_least, style_most) = SUBJECT_PICTURES, STYLE_PICTURES
    usual = f"a LoRA of a person or object usually needs {subject_least} to {subject_most}, a style {style_least} to"
    if pictures < subject_least:
        only = "No usable pictures" if not pictures else f"Only {pictures} picture{'s' * (pictures != 1)}"
        return [Finding("too-few", (), f"{only}: {usual} {style_most}; add more, each different from the others.")]
    if pictures > style_most:
        message = (
            f"{pictures} pictures are more than even a style LoRA usually needs ({style_least} to {style_most}): "
            "training takes longer for little gain, so keep the best and most varied."
        )
        return [Finding("too-many", (), message, severity="info")]
    return []


def _near_duplicates(
    examples: list[data.Example], looks: dict[str, Look | None], exact_copies: list[list[str]]
) -> list[Finding]:
    """Groups of pictures that look the same; exact byte copies past the first are the staging checks' to
    report, so they are left out here."""
    copies = {name for group in exact_copies for name in group[1:]}
    candidates = [e for e in examples if e.relpath not in copies and looks[e.relpath] is not None]
    hashes = np.array([looks[e.relpath].phash for e in candidates], dtype=np.uint64)
    colours = [np.frombuffer(looks[e.relpath].colours, dtype=np.uint8).astype(np.int16) for e in candidates]
    group_of = list(range(len(candidates)))

    def root(index: int) -> int:
        while group_of[index] != index:
            index = group_of[index]
        return index

    for index in range(len(candidates) - 1):
        differing = np.unpackbits((hashes[index] ^ hashes[index + 1 :]).view(np.uint8).reshape(-1, 8), axis=1)
        for other in np.flatnonzero(differing.sum(axis=1) <= NEAR_DUPLICATE_BITS) + index + 1:
            if np.abs(colours[index] - colours[other]).mean() <= NEAR_COLOUR_DIFFERENCE:
                group_of[root(other)] = root(index)
    groups: dict[int, list[data.Example]] = {}
    for index, example in enumerate(candidates):
        groups.setdefault(root(index), []).append(example)
    findings = []
    for group in (g for g in groups.values() if len(g) > 1):
        # Keep the most pixels, then the most bytes (the least compressed copy).
        keep = max(group, key=lambda e: (e.size[0] * e.size[1], e.path.stat().st_size))
        files = (keep.relpath, *(e.relpath for e in group if e is not keep))
        largest = sum(e.size == keep.size for e in group) == 1
        weighs = "twice" if len(files) == 2 else f"{len(files)} times"
        message = (
            f"{_names(files)} are nearly the same picture; keep {keep.relpath} (the "
            f"{'largest' if largest else 'least compressed'}) and remove the other{'s' * (len(files) > 2)}, "
            f"or that picture weighs {weighs} as much in training."
        )
        findings.append(Finding("near-duplicate", files, message, "keep-first"))
    return findings


def _pairs(report: DatasetReport) -> list[Finding]:
    """An edit's pairs: after pictures without their before picture, before pictures without a partner, pairs that
    show no change, pairs of two shapes."""
    findings = []
    if missing := report.no_before:
        message = (
            f"{_names(missing)} {_has(missing)} no before picture (one of the same name, in any picture format), so "
            f"{_it(missing, 'it is', 'they are')} left out of training; add {_its(missing)} before "
            f"picture{'s' * (len(missing) > 1)}, or remove {_it(missing)}."
        )
        findings.append(Finding("pair-no-before", tuple(missing), message, "remove"))
    if alone := report.no_after:
        message = (
            f"The before picture{'s' * (len(alone) > 1)} {_names(alone)} {_has(alone)} no after picture of "
            f"{_its(alone)} name, so {_it(alone, 'it is', 'they are')} not used; rename {_it(alone)} as "
            f"{_its(alone)} after picture{'s' * (len(alone) > 1)}, or remove {_it(alone)}."
        )
        findings.append(Finding("pair-no-after", tuple(alone), message, "remove-before"))
    if unchanged := tuple(e.relpath for e in report.usable if e.control is not None and _unchanged(e)):
        one = len(unchanged) == 1
        message = (
            f"{_names(unchanged)} {_it(unchanged, 'looks', 'look')} the same as {_its(unchanged)} before picture, "
            f"so {'that pair shows' if one else 'those pairs show'} no change to learn; give the picture from before "
            f"the edit as {_its(unchanged)} before picture{'s' * (not one)}, or remove the pair{'s' * (not one)}."
        )
        findings.append(Finding("pair-unchanged", unchanged, message, "remove"))
    if report.reshaped:
        one = len(report.reshaped) == 1
        names, shapes = zip(*(entry.rsplit(": before ", 1) for entry in report.reshaped), strict=True)
        shapes = [f"{name} (before {shape})" for name, shape in zip(names, shapes, strict=True)]
        message = (
            f"{'The pair' if one else 'The pairs'} {_names(shapes)} {'differs' if one else 'differ'} in shape, so "
            f"{'its' if one else 'each'} before picture is stretched to {'its' if one else 'the'} after picture's "
            "shape and the LoRA learns the stretch with the edit; crop or resize each before picture to its after "
            f"picture's shape, or remove the pair{'s' * (not one)}."
        )
        findings.append(Finding("pair-shape", names, message, "remove"))
    return findings


def _unchanged(example: data.Example) -> bool:
    after, before = _looks(example.path), _looks(example.control)
    if after is None or before is None:
        return False
    colours = np.frombuffer(after.colours, np.uint8).astype(np.int16) - np.frombuffer(before.colours, np.uint8)
    return after.phash == before.phash and float(np.abs(colours).mean()) <= PAIR_UNCHANGED_DIFFERENCE


def _has(files) -> str:
    return "has" if len(files) == 1 else "have"


def _it(files, one: str = "it", many: str = "them") -> str:
    return one if len(files) == 1 else many


def _its(files) -> str:
    return "its" if len(files) == 1 else "their"


def _too_small(small: list[data.Example], examples: list[data.Example], resolution: int) -> list[Finding]:
    if not small:
        return []
    if len(small) == len(examples):
        largest = max(min(example.size) for example in small)
        lower = max(BUCKET_STEP, largest // BUCKET_STEP * BUCKET_STEP)
        message = (
            f"All {len(small)} pictures are smaller than the training resolution ({resolution} px on the shorter "
            f"side; the largest has {largest} px), so training enlarges them and the LoRA learns blur; set the "
            f"resolution to {lower} px, or use larger pictures."
        )
        return [Finding("too-small", tuple(e.relpath for e in small), message)]
    named = [f"{e.relpath} ({e.size[0]}x{e.size[1]})" for e in small]
    one = len(small) == 1
    message = (
        f"{_names(named)} {'is' if one else 'are'} smaller than the training resolution ({resolution} px on the "
        f"shorter side), so training enlarges {'it' if one else 'them'} and the LoRA learns blur; use a larger "
        f"version, or remove {'it' if one else 'them'}."
    )
    return [Finding("too-small", tuple(e.relpath for e in small), message, "remove")]


def _blurry(looks: dict[str, Look | None]) -> list[Finding]:
    measured = {name: look.sharpness for name, look in looks.items() if look and look.sharpness is not None}
    if len(measured) < BLUR_MIN_PICTURES:
        return []  # too few to say what sharp is for this set
    # Relative to the set, so a soft style or a foggy series is not all flagged.
    typical = float(np.median(list(measured.values())))
    blurry = tuple(name for name, value in measured.items() if value < BLUR_FRACTION * typical)
    if not blurry:
        return []
    one = len(blurry) == 1
    message = (
        f"{_names(blurry)} {'looks' if one else 'look'} blurry next to the other pictures, and the LoRA would "
        f"learn the blur; replace {'it' if one else 'them'} with a sharper version, or remove "
        f"{'it' if one else 'them'}."
    )
    return [Finding("blurry", blurry, message, "remove")]


def _extreme_shapes(examples: list[data.Example], resolution: int) -> list[Finding]:
    ratios = {e.relpath: max(e.size) / min(e.size) for e in examples}
    extreme = [name for name, ratio in ratios.items() if ratio > EXTREME_ASPECT]
    if not extreme:
        return []
    widest = max(w / h for w, h in batching.bucket_sizes(resolution, BUCKET_STEP))
    one = len(extreme) == 1
    message = (
        f"{_names([f'{name} ({ratios[name]:.1f}:1)' for name in extreme])} {'is' if one else 'are'} very long "
        f"and narrow, so training crops {'it' if one else 'them'} to at most {widest:.1f}:1 and cuts much away; "
        f"crop {'it' if one else 'them'} to the part that matters, or remove {'it' if one else 'them'}."
    )
    return [Finding("aspect-ratio", tuple(extreme), message, "remove")]


def _buckets(examples: list[data.Example], resolution: int) -> list[Finding]:
    if not examples:
        return []
    spread = Counter(batching.assign_buckets(examples, resolution, BUCKET_STEP, aspect_buckets=True))
    sizes = ", ".join(f"{count} in {w}x{h}" for (w, h), count in spread.most_common())
    kinds = f"{len(spread)} shape{'s' * (len(spread) != 1)}"
    message = f"Training batches pictures of one shape together; at {resolution} px these fall into {kinds}: {sizes}."
    return [Finding("buckets", (), message, severity="info")]


def _captions(
    examples: list[data.Example], uncaptioned: list[str], default_caption: str, paired: bool = False
) -> list[Finding]:
    findings = []
    if uncaptioned:
        one = len(uncaptioned) == 1
        message = (
            f"{_names(uncaptioned)} {'has' if one else 'have'} no caption, so {'it is' if one else 'they are'} "
            f"left out of training; write {'one' if one else 'one for each'}, or set a default caption."
        )
        findings.append(Finding("caption-empty", tuple(uncaptioned), message))
    captions = {" ".join(example.caption.lower().split()) for example in examples}
    # One caption chosen as the default for all is the person's choice; the same one typed everywhere is a slip, but
    # for edit pairs, whose caption says the edit, the usual.
    if len(examples) > 1 and len(captions) == 1 and examples[0].caption != default_caption.strip() and not paired:
        message = (
            f'All {len(examples)} pictures have the same caption ("{examples[0].caption}"), so the LoRA can\'t '
            "tell them apart and ties everything in them to those words; describe what differs in each "
            "(pose, background, clothing, light)."
        )
        findings.append(Finding("captions-identical", tuple(e.relpath for e in examples), message))
    return findings


def _words(caption: str) -> list[str]:
    """A caption's words as data.full_caption splits them, so both agree on whether the trigger is there."""
    return caption.replace(",", " ").split()


def _trigger(examples: list[data.Example], trigger: str) -> list[Finding]:
    """Captions without the trigger word, and captions that spell it in another case ("Sks" for "sks"):
    whether case matters depends on the text encoder (CLIP lowercases, T5 does not), one spelling is right
    for both. Spellings apart ("s k s") are not looked for."""
    if not trigger:
        return []
    missing, other_case, spellings = [], [], set()
    for example in examples:
        words = _words(example.caption)
        if trigger in words:
            continue
        variants = [word for word in words if word.lower() == trigger.lower()]
        if variants:
            other_case.append(example.relpath)
            spellings.update(variants)
        else:
            missing.append(example.relpath)
    findings = []
    if missing:
        one = len(missing) == 1
        message = (
            f'{_names(missing)} {"has a caption" if one else "have captions"} without the trigger word "{trigger}"; '
            f"add it at the start (training does this for you when the trigger word is set)."
        )
        findings.append(Finding("trigger-missing", tuple(missing), message, "add-trigger", "info"))
    if other_case:
        written = ", ".join(f'"{spelling}"' for spelling in sorted(spellings))
        message = (
            f"{_names(other_case)} {'writes' if len(other_case) == 1 else 'write'} the trigger word as {written} "
            f'instead of "{trigger}"; write it '
            f'"{trigger}" everywhere, so the LoRA learns one word.'
        )
        findings.append(Finding("trigger-inconsistent", tuple(other_case), message, "match-trigger"))
    return findings


def _too_long(examples: list[data.Example], trigger: str, family: str | None) -> list[Finding]:
    reader = _reader(family)
    # The caption as trained: with the trigger word in front when it lacks it.
    counts = {e.relpath: reader.count(data.full_caption(e.caption, trigger)) for e in examples}
    long = tuple(name for name, count in counts.items() if count > reader.limit)
    if not long:
        return []
    about = "about " if reader.tokenizer is None else ""
    most = max(counts[name] for name in long)
    length = f"{about}{most} tokens long" if len(long) == 1 else f"up to {about}{most} tokens long"
    message = (
        f"The caption{'s' * (len(long) > 1)} of {_names(long)} {'is' if len(long) == 1 else 'are'} {length}, "
        f"more than the {reader.limit} the text encoder reads, so the end is cut off; shorten "
        f"{'it' if len(long) == 1 else 'them'}, putting what matters first."
    )
    return [Finding("caption-too-long", long, message)]


# ---- one-click fixes --------------------------------------------------------------------------
def apply_fix(where: Path | Staging, finding: Finding, trigger: str = "") -> str:
    """Do a finding's fix in a folder of pictures with same-name .txt captions (the staging folder's layout, or a
    Staging, whose limits the captions it writes keep to); returns what was done, in a sentence."""
    folder = where.folder if isinstance(where, Staging) else Path(where).expanduser()
    if finding.fix is None:
        raise DataError(f"{finding.kind}: there is no one-click fix for this; {finding.message}")
    if finding.fix not in _FIXES:
        raise DataError(f"unknown fix {finding.fix!r}; known: {', '.join(_FIXES)}")
    if not folder.is_dir():
        raise DataError(f"the image folder {folder} does not exist; check the path")
    return _FIXES[finding.fix](where if isinstance(where, Staging) else Staging(folder), finding, trigger.strip())


def _remove(staging: Staging, files: tuple[str, ...]) -> str:
    for relpath in files:
        staging.remove(relpath)
    return f"Removed {_names(files)}, with {'its' if len(files) == 1 else 'their'} caption{'s' * (len(files) > 1)}."


def _keep_first(staging: Staging, finding: Finding, trigger: str) -> str:
    return f"Kept {finding.files[0]}. " + _remove(staging, finding.files[1:])


def _remove_befores(staging: Staging, finding: Finding, trigger: str) -> str:
    for relpath in finding.files:
        staging.remove_before(relpath)
    one = len(finding.files) == 1
    return f"Removed the before picture{'s' * (not one)} {_names(finding.files)}."


def _remove_all(staging: Staging, finding: Finding, trigger: str) -> str:
    return _remove(staging, finding.files)


def _edit_captions(staging: Staging, files: tuple[str, ...], edit) -> int:
    if data.metadata_captions(staging.folder) is not None:
        raise DataError("the captions here come from metadata.jsonl or metadata.csv; change them in that file")
    changed = 0
    for relpath in files:
        caption_file = (staging.folder / relpath).with_suffix(".txt")
        caption = data.read_caption_file(caption_file) if caption_file.is_file() else ""
        if (new := edit(caption)) != caption:
            staging.set_caption(relpath, new)
            changed += 1
    return changed


def _add_trigger(staging: Staging, finding: Finding, trigger: str) -> str:
    if not trigger:
        raise DataError("type the trigger word first (a rare made-up word such as sks or ohwx)")
    changed = _edit_captions(staging, finding.files, lambda caption: data.full_caption(caption, trigger))
    return f'Put "{trigger}" in front of {changed} caption{"s" * (changed != 1)}.'


def _match_trigger(staging: Staging, finding: Finding, trigger: str) -> str:
    if not trigger:
        raise DataError("type the trigger word first (a rare made-up word such as sks or ohwx)")
    spelled = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)
    changed = _edit_captions(staging, finding.files, lambda caption: spelled.sub(trigger, caption))
    return f'Wrote the trigger word as "{trigger}" in {changed} caption{"s" * (changed != 1)}.'


_FIXES = {
    "keep-first": _keep_first,
    "remove": _remove_all,
    "remove-before": _remove_befores,
    "add-trigger": _add_trigger,
    "match-trigger": _match_trigger,
}
