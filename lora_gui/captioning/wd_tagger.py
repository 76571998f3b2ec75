"""SmilingWolf's WD taggers (v3): booru tags for anime and illustration, run through onnxruntime as kohya_ss and
OneTrainer run them.

A tagger is a folder (a Hub repo such as SmilingWolf/wd-swinv2-tagger-v3) holding `model.onnx`, which takes a batch
of square BGR pictures, 0-255 in float32, NHWC, and gives one score (already a sigmoid) per tag, and
`selected_tags.csv` (tag_id,name,category,count), one row per score in the same order: category 9 is a rating,
4 a character, 0 a general tag. `write_tiny` writes a tiny random one in that layout, which the tests load through
the same `load` as the real ones.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from lora_gui.captioning import Captioner, CaptionerInfo, model_folder
from lora_gui.downloads import DownloadProgress, HubToken
from lora_gui.errors import ConfigError, LoraGuiError, ModelLoadError

if TYPE_CHECKING:
    from lora_gui.downloads import DownloadProgress, HubToken

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = "9", "0", "4"
# The defaults of SmilingWolf's own demo (kohya_ss's general one too): a character tag must be surer, since a wrong
# name teaches the LoRA the wrong person.
THRESHOLD, CHARACTER_THRESHOLD = 0.35, 0.85
# Tags whose underscores are the face itself, kept as they are (the list of SmilingWolf's demo); every other tag's
# underscores become spaces, as the text encoders read words.
KAOMOJIS = frozenset(
    "0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||".split()
)
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
NO_CUDA_HERE = (
    "this onnxruntime has no GPU support (install onnxruntime-gpu in place of onnxruntime to tag on an NVIDIA GPU)"
)


@dataclass(frozen=True)
class Tag:
    name: str  # as the caption writes it: "long hair", "^_^"
    category: str


def display_name(tag: str) -> str:
    """A tag as a caption writes it: underscores to spaces, but a kaomoji kept as it is."""
    return tag if tag in KAOMOJIS else tag.replace("_", " ")


class WdTagger(Captioner):
    """A loaded WD tagger: each picture's character tags first, then its general tags, each group surest first,
    comma-separated; rating tags (general, sensitive...) are never written, as they say nothing a LoRA should learn.

    Options: `threshold` (how sure a general tag must be, 0 to 1), `character_threshold`, `exclude` (tags to leave
    out: a list, or one comma-separated text; "long hair" and "long_hair" are the same tag)."""

    infos = (
        CaptionerInfo(
            "wd-tagger",
            "WD tagger (SwinV2 v3): booru tags, for anime and illustration",
            "SmilingWolf/wd-swinv2-tagger-v3",
            467,
            "tags",
        ),
        CaptionerInfo(
            "wd-tagger-large",
            "WD tagger large (EVA02 v3): the most accurate booru tags, slower",
            "SmilingWolf/wd-eva02-large-tagger-v3",
            1260,
            "tags",
        ),
    )

    def __init__(
        self,
        session: Any,
        tags: list[Tag],
        threshold: float = THRESHOLD,
        character_threshold: float = CHARACTER_THRESHOLD,
        exclude: Iterable[str] = (),
        runs_on: str = "the CPU",
    ):
        self.session, self.tags = session, tags
        self.threshold, self.character_threshold = threshold, character_threshold
        self.exclude = frozenset(display_name(tag.strip().lower()) for tag in exclude if tag.strip())
        self.runs_on = runs_on  # "the CPU" or "the GPU", for the user to read
        model_input = session.get_inputs()[0]
        self.input_name, self.size = model_input.name, int(model_input.shape[1])
        # A model exported for a fixed batch takes only that many pictures at a time (kohya's note on rebatched ones).
        batch = model_input.shape[0]
        self.batch = batch if isinstance(batch, int) and batch > 0 else None
        self._category = np.array([tag.category for tag in tags])

    @classmethod
    def load(
        cls,
        info: CaptionerInfo,
        source: str | Path | None = None,
        device: str = "cpu",
        token: HubToken = None,
        on_progress: Callable[[DownloadProgress], None] | None = None,
        **options: object,
    ) -> WdTagger:
        settings = _options(options)
        folder = _checked(*model_folder(info, source, [MODEL_FILE, TAGS_FILE], "tagger", token, on_progress))
        tags = read_tags(folder / TAGS_FILE)
        session, runs_on = _session(folder / MODEL_FILE, device)
        _check_fits(session, tags, folder)
        return cls(session, tags, runs_on=runs_on, **settings)

    def caption(self, images: list[Image.Image]) -> list[str]:
        if self.session is None:
            raise LoraGuiError("this captioner was closed: load it again to caption more pictures")
        if not images:
            return []
        pictures = np.stack([preprocess(image, self.size) for image in images])
        step = self.batch or len(pictures)
        scores = np.concatenate(
            [
                self.session.run(None, {self.input_name: pictures[start : start + step]})[0]
                for start in range(0, len(pictures), step)
            ]
        )
        return [self.tags_of(row) for row in scores]

    def tags_of(self, scores: np.ndarray) -> str:
        """One picture's caption from its scores (one per tag)."""
        picked = []
        for category, threshold in ((CHARACTER, self.character_threshold), (GENERAL, self.threshold)):
            found = np.flatnonzero((self._category == category) & (scores >= threshold))
            picked += [self.tags[i].name for i in found[np.argsort(-scores[found], kind="stable")]]
        return ", ".join(name for name in picked if name.lower() not in self.exclude)

    def close(self) -> None:
        # onnxruntime frees the session's memory (a GPU's too) when the session goes.
        self.session = None


def _options(options: dict[str, object]) -> dict[str, Any]:
    """The tagger's own settings from `options`, checked, in words a user can act on."""
    settings: dict[str, Any] = {}
    for name in ("threshold", "character_threshold"):
        if options.get(name) is None:
            continue
        value = options.pop(name)
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(
                f"the WD tagger's {name.replace('_', ' ')} must be a number above 0 and at most 1 (got {value})"
            )
        settings[name] = float(value)
    exclude = options.pop("exclude", None) or ()
    settings["exclude"] = exclude.split(",") if isinstance(exclude, str) else [str(tag) for tag in exclude]
    unknown = [name for name, value in options.items() if value is not None]
    if unknown:
        raise ConfigError(
            f"the WD tagger has no setting {', '.join(unknown)}: it takes threshold, character_threshold and exclude"
        )
    return settings


def _checked(folder: Path, repo_id: str = "") -> Path:
    missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (folder / name).is_file()]
    if missing:
        where = f"the download of {repo_id}" if repo_id else str(folder)
        raise ModelLoadError(
            f"{where} is not a WD tagger: it has no {' or '.join(missing)} (a tagger holds {MODEL_FILE} and "
            f"{TAGS_FILE}, as on SmilingWolf/wd-swinv2-tagger-v3)"
        )
    return folder


def read_tags(path: Path) -> list[Tag]:
    """A tagger's tags, in the order of its scores, from its selected_tags.csv."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise ModelLoadError(f"{path} is not a WD tagger's tag list: it needs the columns tag_id,name,category,count")
    return [Tag(display_name(row["name"].strip()), row["category"].strip()) for row in rows]


def _session(path: Path, device: str) -> tuple[Any, str]:
    """An onnxruntime session for `path` on the GPU when `device` asks for it and onnxruntime can, else on the CPU
    (saying why), and which of them it runs on."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("the WD tagger needs onnxruntime: pip install -r requirements.txt") from None
    providers: list[Any] = [CPU]
    if device.startswith("cuda"):
        if CUDA in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            providers = [(CUDA, {"device_id": index}), CPU]
        else:
            log.warning("Tagging on the CPU: %s", NO_CUDA_HERE)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its own notes (unused initializers...) would bury ours
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:
        raise ModelLoadError(
            f"could not load the tagger {path}: it looks damaged or incomplete ({str(error).splitlines()[0]}); "
            "delete it so it downloads again"
        ) from None
    on_gpu = session.get_providers()[0] == CUDA
    if len(providers) > 1 and not on_gpu:
        log.warning("Tagging on the CPU: onnxruntime could not start on the GPU (its CUDA libraries did not load)")
    return session, "the GPU" if on_gpu else "the CPU"


def _check_fits(session: Any, tags: list[Tag], folder: Path) -> None:
    """The model and its tag list belong together, and the model takes pictures as a WD tagger does."""
    shape, scores = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 3:
        raise ModelLoadError(f"{folder / MODEL_FILE} is not a WD tagger: it takes {shape}, not [N, size, size, 3]")
    if isinstance(scores[-1], int) and scores[-1] != len(tags):
        raise ModelLoadError(
            f"{folder}: {MODEL_FILE} gives {scores[-1]} scores but {TAGS_FILE} lists {len(tags)} tags; "
            "the two files come from different taggers"
        )


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """A picture as the tagger was trained to see it (SmilingWolf's own demo): padded to a square on white, centred,
    resized to `size` with bicubic filtering, BGR, float32 from 0 to 255, height x width x channels."""
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


# ---- a tiny random tagger, in the real layout, for the tests ---------------------------------------------------
TINY_SIZE = 64
TINY_TAGS = (  # (name, category), in the order of the scores: ratings first, as in SmilingWolf's files
    *(("general", RATING), ("sensitive", RATING), ("questionable", RATING), ("explicit", RATING)),
    *(("1girl", GENERAL), ("solo", GENERAL), ("long_hair", GENERAL), ("smile", GENERAL), ("^_^", GENERAL)),
    *(("simple_background", GENERAL), ("white_background", GENERAL), ("red_eyes", GENERAL)),
    *(("hatsune_miku", CHARACTER), ("kirisame_marisa", CHARACTER), ("hakurei_reimu", CHARACTER)),
)


def write_tiny(folder: Path, scores: Sequence[float] | None = None, seed: int = 0) -> Path:
    """A tiny WD tagger in `folder`: `model.onnx` takes [N, 64, 64, 3] and gives [N, T] sigmoid scores from the
    pictures' mean colour through random weights; with `scores` (one per tag of TINY_TAGS), exactly those for any
    picture. And its `selected_tags.csv`. Returns `folder`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count, random = len(TINY_TAGS), np.random.default_rng(seed)
    if scores is None:
        weights = random.normal(0, 4, (3, count)).astype(np.float32)
        bias = random.normal(-1, 1, count).astype(np.float32)
    else:
        weights = np.zeros((3, count), np.float32)
        bias = np.array([math.log(p / (1 - p)) for p in np.clip(scores, 1e-6, 1 - 1e-6)], np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["colour"], keepdims=0),  # [N, 3], 0 to 255
        helper.make_node("Mul", ["colour", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weights"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    constants = [
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(bias, "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_wd_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", TINY_SIZE, TINY_SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", count])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what every onnxruntime since 1.14 reads
    onnx.checker.check_model(model)
    onnx.save(model, folder / MODEL_FILE)
    with (folder / TAGS_FILE).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows((index, name, category, 1000 - index) for index, (name, category) in enumerate(TINY_TAGS))
    return folder
