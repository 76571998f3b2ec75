"""What every tab shares: the app's services, the component registry, and small display helpers."""

from __future__ import annotations

import html
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio import processing_utils
from gradio import utils as gradio_utils

from lora_gui.base_models import family_from_files
from lora_gui.captioning import ensure_tiny_captioner, load_captioner
from lora_gui.captioning.folder import DRAFT_SIDE, caption_in_background
from lora_gui.config import list_presets, load_preset
from lora_gui.data import UnusableImage, open_image
from lora_gui.demo import DEMO_MODEL
from lora_gui.devices import matmul_tflops
from lora_gui.downloads import HubToken
from lora_gui.errors import ConfigError, DataError, LoraGuiError
from lora_gui.families import REGISTRY
from lora_gui.infer import GeneratorCache
from lora_gui.jobs import JobManager
from lora_gui.limits import Limits, check_free_disk, check_runs_waiting
from lora_gui.lora_files.export import export_run
from lora_gui.model_policy import HUB_IDS_ONLY, BaseModelPolicy, is_hub_id
from lora_gui.owners import EVERYONE, Visitor, anonymous, signed_in, user
from lora_gui.runs import RunFolder, RunSummary, check_run_name, list_runs
from lora_gui.staging import Staging
from lora_gui.tiny import ensure_tiny_model

TINY_CHOICE = "Demo model (offline, CPU: draws shapes)"  # the SD 1.x one: trained, shipped, what the demo uses
# The offline models of each family by their menu names, so every family can be tried offline: SD 1.x's is the demo
# model (demo.DEMO_MODEL, trained on drawn shapes), the others tiny random-weight models.
TINY_CHOICES = {
    TINY_CHOICE: "sd15",
    **{f"Tiny {family.short_title} demo (offline, CPU)": name for name, family in REGISTRY.items() if name != "sd15"},
}
# The tiny random tagger in the captioner menu: offline, instant, and its tags are random.
TINY_CAPTIONER = "Tiny random tagger (offline demo: its tags are random)"
MODELS_FOLDER = ".models"  # under the runs dir, so the Space's persistent storage keeps the tiny models
ALLOW_PATHS_ENV = "LORA_GUI_ALLOW_PATHS"
BASE_MODELS_ENV = "LORA_GUI_BASE_MODELS"  # comma-separated Hub ids: the only ones this server accepts
MAX_MODEL_GB_ENV = "LORA_GUI_MAX_MODEL_GB"
SPACE_MAX_MODEL_GB = 40.0  # a Space's disk is small and shared by every visitor's downloads
# The two layouts a run's LoRA can be downloaded in, named by the programs that load them.
# AUTOMATIC1111 runs Stable Diffusion models only; Forge and ComfyUI run Flux.1 too.
LOADS_IN = {"kohya": "AUTOMATIC1111 (Stable Diffusion), Forge and ComfyUI", "diffusers": "diffusers (Python)"}
LAYOUT_CHOICES = [
    (f"For {LOADS_IN['kohya']} (<run name>.safetensors)", "kohya"),
    (f"For {LOADS_IN['diffusers']} (pytorch_lora_weights.safetensors)", "diffusers"),
]


def on_space() -> bool:
    """Whether the app runs as a Hugging Face Space, where visitors are strangers to the server."""
    return bool(os.environ.get("SPACE_ID"))


def sign_in_available() -> bool:
    """Whether visitors can sign in with Hugging Face: a Space whose README asks for it (hf_oauth: true), which
    gives the app its OAuth client. Gradio's own test for a Space is SYSTEM=spaces."""
    return os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("OAUTH_CLIENT_ID"))


def paths_allowed() -> bool:
    """Visitors of a Hugging Face Space may not read the server's files unless its owner allows it."""
    if os.environ.get(ALLOW_PATHS_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    return not on_space()


def base_model_policy(hub_only: bool, on_space: bool, own: tuple[str, ...] = ()) -> BaseModelPolicy:
    """Which base models visitors may name, from the server's environment; `own`: the app's tiny models' paths."""
    allowed = tuple(name.strip() for name in os.environ.get(BASE_MODELS_ENV, "").split(",") if name.strip())
    limit = os.environ.get(MAX_MODEL_GB_ENV, "").strip()
    try:
        max_gb = float(limit) if limit else (SPACE_MAX_MODEL_GB if on_space else None)
    except ValueError:
        raise ConfigError(f"{MAX_MODEL_GB_ENV} must be a number of gigabytes, not {limit!r}") from None
    return BaseModelPolicy(hub_only, allowed, None if max_gb is None else int(max_gb * 1e9), own)


@dataclass
class Ctx:
    """The app's services and every tab's components by name, handed to each tab builder."""

    runs_dir: Path
    jobs: JobManager
    generators: GeneratorCache
    allow_paths: bool
    has_cuda: bool
    on_space: bool = False
    users: tuple[str, ...] = ()  # the --auth users, when there are several: each sees only their own runs
    sign_in: bool = False  # visitors sign in with Hugging Face (a Space with hf_oauth)
    limits: Limits = field(default_factory=Limits)  # what one visitor may use (limits.py)
    components: dict[str, gr.components.Component] = field(default_factory=dict)
    _tflops: float | None = field(default=None, init=False)
    _caption_stops: dict[str, threading.Event] = field(default_factory=dict, init=False)

    def add(self, components: dict[str, Any]) -> dict[str, Any]:
        clashes = set(components) & set(self.components)
        if clashes:
            raise ValueError(f"component names used twice: {sorted(clashes)}")
        self.components.update(components)
        return components

    def __getitem__(self, name: str) -> Any:
        return self.components[name]

    def wire(
        self,
        trigger: Callable,
        handler: Callable[..., dict[str, Any]],
        inputs: list[str],
        outputs: list[str],
        extra_inputs: dict[str, Any] | None = None,
        reports_progress: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Connect an event to `handler(ctx, **values_by_name) -> {name: new value}`.

        Handlers see and return plain dicts keyed by component name, never long positional lists;
        the names are also the parameter names of the app's API (gradio_client). A handler that
        `reports_progress` also gets `progress`, Gradio's progress bar over its outputs.
        """

        wants_visitor = "visitor" in inspect.signature(handler).parameters

        def call(
            request: gr.Request, profile: Any = None, token: Any = None, progress: Any = None, *, values: dict[str, Any]
        ) -> Any:
            # Who is asking is worked out here, for every event, from what the caller can't forge: the
            # server-side session, the sign-in cookie, the --auth login. Never from the page.
            visitor = self.visitor(request, values.pop("owner", ""), profile, token)
            extra = {"visitor": visitor} if wants_visitor else {}
            return handler(self, **values, **extra, **({"progress": progress} if reports_progress else {}))

        def shown(result: dict[str, Any]) -> Any:
            if not result:  # Gradio reads an empty dict as one output's value, not as "no change"
                return gr.skip() if len(outputs) == 1 else tuple(gr.skip() for _ in outputs)
            return {self.components[name]: value for name, value in result.items()}

        # Gradio hands the special values (the request, the sign-in, its progress bar) first, by position.
        def run(*special: Any, **values: Any) -> Any:
            return shown(call(*special, values=values))

        def run_steps(*special: Any, **values: Any) -> Any:  # a long task, showing how far it got as it goes
            for result in call(*special, values=values):
                yield shown(result)

        target = run_steps if inspect.isgeneratorfunction(handler) else run

        # Gradio's API makes a parameter optional when the component starts with a value, or when the
        # function's own parameter defaults to None: so an empty file or menu may be left out of a call too.
        components = {**{name: self.components[name] for name in inputs}, **(extra_inputs or {})}
        if "owner" in self.components:  # the page's owner id, set when it loads (a test's bare Ctx has none)
            components.setdefault("owner", self.components["owner"])
        parameters = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None if getattr(component, "value", None) is None else inspect.Parameter.empty,
            )
            for name, component in components.items()
        ]
        # Gradio fills leading parameters by their types: the request, the signed-in visitor and their token,
        # and its progress bar where the parameter's default is one.
        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        special = [
            inspect.Parameter("request", positional),
            inspect.Parameter("oauth_profile", positional, default=None),
            inspect.Parameter("oauth_token", positional, default=None),
        ]
        if reports_progress:
            special.append(inspect.Parameter("progress", positional, default=gr.Progress()))
        target.__signature__ = inspect.Signature(special + parameters)  # type: ignore[attr-defined]
        target.__annotations__ = {
            "request": gr.Request,
            "oauth_profile": gr.OAuthProfile | None,
            "oauth_token": gr.OAuthToken | None,
        }

        return trigger(
            target,
            inputs_kwargs=components or None,
            outputs=[self.components[name] for name in outputs],
            **kwargs,
        )

    # ---- who is asking ------------------------------------------------------------------------
    @property
    def shared(self) -> bool:
        """Whether visitors are kept apart: on a Space, or with several --auth users."""
        return self.on_space or len(self.users) > 1

    def visitor(
        self,
        request: gr.Request | None,
        owner: str = "",
        profile: gr.OAuthProfile | None = None,
        token: gr.OAuthToken | None = None,
    ) -> Visitor:
        """Who sent an event. The one user of an unshared app owns everything; an --auth user is their login; on a
        Space, a visitor signed in with Hugging Face is their account (and keeps what they made before signing in),
        anyone else the anonymous id the page set from the secret in their browser, or, for an API client that
        never loaded the page, one made from its session."""
        if not self.shared:
            return EVERYONE
        if self.users:
            name = getattr(request, "username", None) or ""
            return Visitor(owner=user(name), name=name)
        session = getattr(request, "session_hash", None) or ""
        anonymous_id = owner or anonymous(f"session:{session}")
        if profile is None:
            return Visitor(owner=anonymous_id)
        return Visitor(
            owner=signed_in(profile.username),
            also=(anonymous_id,),
            hub_token=token.token if token is not None else None,
            name=profile.username,
        )

    def run_folder(self, name: str, visitor: Visitor = EVERYONE) -> RunFolder:
        """The folder of a run picked in the page, if `visitor` may see it; the name is checked, so it can't point
        elsewhere. Another visitor's run gets the same answer as a run that does not exist."""
        run = RunFolder(self.runs_dir / check_run_name(name or ""))
        if not run.path.is_dir() or not visitor.owns_folder(run.path):
            raise LoraGuiError(f"there is no run named {name} (was it deleted?)")
        return run

    def runs_of(self, visitor: Visitor) -> list[RunSummary]:
        """`visitor`'s runs, newest first."""
        return list_runs(self.runs_dir, include=visitor.owns_folder)

    def staging(self, session: str, visitor: Visitor) -> Staging:
        """The visitor's staged pictures (a new folder of theirs when the page has none yet), within this server's
        limits."""
        staging = Staging.for_session(self.runs_dir, session, visitor)
        staging.limits = self.limits
        return staging

    def check_room_for_a_run(self, visitor: Visitor) -> None:
        """Refuses one more run of a visitor who has as many queued or training as this server allows, and any run
        when the disk is too full for its checkpoints."""
        check_runs_waiting(self.jobs.waiting(visitor.owner), self.limits)
        check_free_disk(self.runs_dir, self.limits)

    # ---- base models --------------------------------------------------------------------------
    def tiny_model(self, family: str) -> Path:
        """A family's offline model: SD 1.x's is the demo model shipped with the app; the others are random, written
        under the runs folder the first time they are asked for."""
        if family == TINY_CHOICES[TINY_CHOICE]:
            return DEMO_MODEL
        return self.runs_dir / MODELS_FOLDER / f"tiny-{family}"

    @property
    def model_policy(self) -> BaseModelPolicy:
        """Where visitors may not use the server's files, base models are Hub ids only, never looked up on disk."""
        own = tuple(str(self.tiny_model(family)) for family in TINY_CHOICES.values())
        return base_model_policy(hub_only=not self.allow_paths, on_space=self.on_space, own=own)

    def resolve_base_model(self, choice: str, token: HubToken = None) -> str:
        """What the trainer loads for a base-model choice: a tiny demo model (written the first time), or the Hub
        id / path as typed, once this server's policy takes it (a Hub model's size is read from the Hub, with
        `token`)."""
        choice = (choice or "").strip()
        if choice in TINY_CHOICES:
            family = TINY_CHOICES[choice]
            return str(ensure_tiny_model(self.tiny_model(family), family))
        if not choice:
            raise ConfigError(f"choose a base model first ({TINY_CHOICE} needs no download)")
        policy = self.model_policy
        if policy.hub_only and not is_hub_id(choice):
            # The same words whatever the server holds: what exists there is not a visitor's to learn.
            raise ConfigError(
                f"{HUB_IDS_ONLY}. This Space does not let visitors use files on the server; its owner can allow "
                f"it by setting {ALLOW_PATHS_ENV}=1"
            )
        if is_hub_id(choice) and (policy.hub_only or not Path(choice).expanduser().exists()):
            policy.check_hub_model(choice, token)
        return choice

    def hub_token(self, typed: str | None, visitor: Visitor = EVERYONE) -> HubToken:
        """The Hugging Face token a visitor's download or upload goes out with: the one typed in, else the one
        their Hugging Face sign-in gave. Else, on a Space, none at all: never the owner's login, under which a
        visitor would download gated models whose licence they never accepted; elsewhere, this computer's login."""
        return (typed or "").strip() or visitor.hub_token or (False if self.on_space else None)

    def base_model_label(self, base_model: str) -> str:
        """How a stored base model is shown: a tiny model by its menu name, anything else as it is."""
        for choice, family in TINY_CHOICES.items():
            if base_model and Path(base_model).resolve() == self.tiny_model(family).resolve():
                return choice
        return base_model

    def base_model_choices(self) -> list[str]:
        """The tiny demo models, then every base model a preset names (so new families appear with their presets)."""
        named = [load_preset(name).base_model for name in list_presets()]
        return [*TINY_CHOICES, *dict.fromkeys(model for model in named if model)]

    def base_model_family(self, choice: str) -> str | None:
        """The family of a base-model choice where it can be told without downloading: a tiny model,
        a model folder or checkpoint file on this server, or a Hub model already downloaded once."""
        choice = (choice or "").strip()
        if choice in TINY_CHOICES:
            return TINY_CHOICES[choice]
        return family_from_files(choice, self.model_policy)

    # ---- captioning ---------------------------------------------------------------------------
    def caption_in_background(
        self,
        choice: str,
        folder: Path,
        visitor: Visitor,
        *,
        overwrite: bool,
        prefix: str,
        should_stop: Callable[[], bool],
    ) -> Iterator[Any]:
        """A captioning pass over a visitor's pictures with the captioner chosen, told as it goes (see
        captioning.folder.caption_in_background), first why it runs on the processor if a run has the GPU."""
        name, load = self._captioner(choice, visitor)
        yield from caption_in_background(
            name, folder, overwrite=overwrite, prefix=prefix, should_stop=should_stop, gpu=self.jobs.gpu, **load
        )

    def caption_picture(self, choice: str, picture: Path, visitor: Visitor) -> str:
        """One picture's caption by the captioner chosen, which is loaded for it and freed after: on the GPU when
        it is captioning's to take (gpu_owner.py), else on the processor."""
        name, load = self._captioner(choice, visitor)
        try:
            image = open_image(picture, draft_side=DRAFT_SIDE)
        except UnusableImage as problem:
            raise DataError(f"{picture.name} can't be captioned: {problem}") from None
        with self.jobs.gpu.captioning_turn() as turn:
            captioner = load_captioner(name, device=turn.device, **load)
            try:
                return captioner.caption([image])[0]
            finally:
                captioner.close()

    def caption_stop(self, session: str, create: bool = True) -> threading.Event:
        """The Stop of a staging folder's captioning: a fresh one for each pass."""
        if create or session not in self._caption_stops:
            self._caption_stops[session] = threading.Event()
        return self._caption_stops[session]

    def _captioner(self, choice: str, visitor: Visitor) -> tuple[str, dict[str, Any]]:
        """The registry name and how to load it, but for the device: the GPU's owner gives that for each pass."""
        if choice == TINY_CAPTIONER:
            return "wd-tagger", {"source": ensure_tiny_captioner(self.runs_dir / MODELS_FOLDER / "tiny-wd-tagger")}
        return choice, {"token": self.hub_token(None, visitor)}

    # ---- the GPU ------------------------------------------------------------------------------
    def gpu_tflops(self) -> float | None:
        """This GPU's measured matrix-multiply rate, for time estimates; measured once, then remembered.

        None without a CUDA GPU, and while a run trains: measuring then would time the run's share too."""
        if self._tflops is None and self.has_cuda and self.jobs.active() is None:
            self._tflops = matmul_tflops()
        return self._tflops


def served(path: str | Path) -> str:
    """A run's file as the page may fetch it: a copy in Gradio's upload folder under a name made from its content.

    The runs folder itself is never served by URL (its pictures and checkpoints are private), so a handler hands
    out copies of only what its visitor may have; the copy is what Gradio would make itself, made here so that
    a runs folder outside the working and temporary folders (a Space's /data) works the same."""
    return processing_utils.save_file_to_cache(path, cache_dir=gradio_utils.get_upload_folder())


def build_export(prefix: str) -> dict[str, Any]:
    """A layout choice, a button and the file to download: a run's LoRA for the program the user has."""
    c: dict[str, Any] = {}
    c[f"{prefix}_layout"] = gr.Radio(
        LAYOUT_CHOICES,
        value="kohya",
        label="Which program will load it?",
        info="Both files hold the same LoRA. AUTOMATIC1111 and Forge: put it in models/Lora; ComfyUI: models/loras.",
    )
    c[f"{prefix}_export"] = gr.Button("Get the LoRA file", size="sm")
    c[f"{prefix}_export_notice"] = gr.HTML()
    c[f"{prefix}_file"] = gr.File(label="Your LoRA file (click its name to download)", interactive=False, visible=False)
    return c


def export_lora(ctx: Ctx, visitor: Visitor, prefix: str, run_name: str | None, layout: str) -> dict[str, Any]:
    """(Re)write a run's LoRA in a layout and offer it in the widgets `build_export(prefix)` made.

    export_run rebuilds the kohya file from the run folder, so it is current even for a run an older
    version of the app trained."""
    if not run_name:
        return {f"{prefix}_export_notice": notice("Pick a run first.", "warning"), f"{prefix}_file": gr.skip()}
    try:
        (path,) = export_run(ctx.run_folder(run_name, visitor).path, layout)
    except LoraGuiError as error:
        return {f"{prefix}_export_notice": error_notice(error), f"{prefix}_file": gr.update(visible=False)}
    return {
        f"{prefix}_export_notice": notice(f"{path.name} is ready for {LOADS_IN[layout]}: click its name below."),
        f"{prefix}_file": gr.update(value=served(path), visible=True),
    }


def hub_token_box(elem_id: str) -> gr.Textbox:
    """A Hugging Face token for downloading a gated base model: hidden as it is typed, handed to the one download
    it is given for, and never saved."""
    return gr.Textbox(
        "",
        type="password",
        label="Hugging Face token (only for gated models such as FLUX.1-dev; used for this download, never saved)",
        placeholder="hf_...",
        info="First accept the model's licence on its Hugging Face page. Make a token with read access at "
        "huggingface.co/settings/tokens.",
        elem_id=elem_id,
    )


def files_label(kind: str, diffusers_file: str = "pytorch_lora_weights.safetensors") -> str:
    """The label of a list of a run's files that says which LoRA file loads where."""
    return (
        f"{kind} (click to download): the one named after the run is for {LOADS_IN['kohya']}; "
        f"{diffusers_file} is for {LOADS_IN['diffusers']}"
    )


def plain_error(error: Exception) -> str:
    """A LoraGuiError's message as a sentence for the page."""
    text = str(error)
    if not any(mark in text.split(" ", 1)[0] for mark in "./\\"):  # a file name or path stays as it is spelled
        text = text[:1].upper() + text[1:]
    return text + ("" if text.endswith(".") else ".")


def notice(text: str, kind: str = "info", link: str = "") -> str:
    """A short message box; kind is info, warning or error; a link (a URL) goes at its end."""
    icon = {"info": "ℹ", "warning": "⚠", "error": "✗"}[kind]
    anchor = f' <a href="{html.escape(link)}" target="_blank" rel="noopener">{html.escape(link)}</a>' if link else ""
    return f'<div class="lg-notice lg-{kind}">{icon} {html.escape(text)}{anchor}</div>'


def error_notice(error: LoraGuiError) -> str:
    return notice(plain_error(error), "error")


VALIDATION_CURVE = "validation loss (held-out pictures)"


def loss_frame(
    points: list[tuple[int, float]], validation: Sequence[tuple[int, float]] | None = None
) -> pd.DataFrame | None:
    """Loss per step, raw and smoothed, and the validation loss where it was measured (None: a run without one),
    in the long form LinePlot draws one line per series from.

    None when there is no loss yet: a plot first drawn from an empty table never draws its lines.

    Diffusion losses jump around from step to step; the smoothed line (a debiased exponential
    moving average, as TensorBoard draws it) shows the trend a person should read. The validation loss is
    measured at fixed noise on pictures never trained on: it needs no smoothing, and says when to stop.
    """
    if not points:
        return None
    weight = 0.9 if len(points) > 20 else 0.6
    smoothed, average = [], 0.0
    for index, (_, loss) in enumerate(points, 1):
        average = weight * average + (1 - weight) * loss
        smoothed.append(average / (1 - weight**index))
    series = {
        "loss at each step": points,
        "smoothed": list(zip((step for step, _ in points), smoothed, strict=True)),
    }
    if validation is not None:
        # A plot keeps the series of its first drawing: one still to be measured is there from the start, empty.
        series[VALIDATION_CURVE] = validation or [(points[0][0], None)]
    rows = [{"step": step, "loss": loss, "curve": name} for name, curve in series.items() for step, loss in curve]
    return pd.DataFrame(rows)


def loss_plot(elem_id: str, label: str = "Loss (lower is better)") -> gr.LinePlot:
    return gr.LinePlot(
        value=None,
        elem_id=elem_id,
        x="step",
        y="loss",
        color="curve",
        color_map={"loss at each step": "#c7d2fe", "smoothed": "#4338ca", VALIDATION_CURVE: "#ea580c"},
        label=label,
        x_title="step",
        y_title="loss",
    )


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "working out the time left"
    seconds = round(seconds)
    if seconds < 90:
        return f"about {seconds} s left"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min left"
    return f"about {seconds / 3600:.1f} h left"
