"""The Gradio app: the page, its tabs, and `launch`. Each tab is a module; no training logic here."""

from __future__ import annotations

import gc
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import gradio as gr
from gradio import utils as gradio_utils
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse

from lora_gui.config import TrainConfig
from lora_gui.demo import (
    CONCEPT_BACKGROUNDS,
    DEMO_EDIT_PRESET,
    DEMO_PRESET,
    EDIT_CAPTION,
    TRIGGER,
    concept_caption,
    demo_config,
    demo_edit_config,
    write_demo_concept,
    write_demo_edit_pairs,
)
from lora_gui.errors import ConfigError
from lora_gui.limits import Limits, expire_runs, make_upload_room
from lora_gui.owners import Visitor, anonymous, app_secret, new_secret
from lora_gui.runs import default_runs_dir, record_interrupted
from lora_gui.staging import Staging, expire_staging
from lora_gui.ui import config_form
from lora_gui.ui.captioning import Captioning
from lora_gui.ui.common import Ctx, notice
from lora_gui.ui.dataset import (
    build_dataset_grid,
    build_dataset_tab,
    build_findings,
    checks_html,
    pages_update,
    wire_dataset_tab,
)
from lora_gui.ui.engine import Engine
from lora_gui.ui.folders import Folders
from lora_gui.ui.generate import build_generate_tab, wire_generate_tab
from lora_gui.ui.model_choices import EDIT_DEMO_CHOICE, EDIT_DEMO_FAMILY, TINY_CHOICE, ModelChoices, paths_allowed
from lora_gui.ui.page import on_space, sign_in_available
from lora_gui.ui.presets import preset_menu
from lora_gui.ui.runs import build_runs_tab, wire_runs_tab
from lora_gui.ui.train_live import POLL_SECONDS
from lora_gui.ui.train_tab import build_train_tab, show_estimate, wire_train_tab

if TYPE_CHECKING:
    from lora_gui.jobs import JobManager

log = logging.getLogger(__name__)

# How long a run may take to stop after SIGTERM or Ctrl+C: Hugging Face Spaces kill the container 30 s after
# SIGTERM, so the run's last step and its save must fit in less.
SHUTDOWN_SECONDS_VARIABLE = "LORA_GUI_SHUTDOWN_SECONDS"
DEFAULT_SHUTDOWN_SECONDS = 25.0

CACHE_SECONDS = 24 * 3600
EXPIRY_SECONDS = 3600.0  # how often old staged pictures and runs are looked for while the app runs

DEMO_IMAGES = 8
EDIT_DEMO_PAIRS = 16  # the edit demo's pairs: two of them held out, its previews edit them
# Shown while torch and diffusers load (ui/engine.py): the page works meanwhile, its first training or picture waits.
ENGINE_LOADING = (
    "Loading the trainer (PyTorch and diffusers) in the background: training and Generate start once it is ready."
)

CSS = """
.lg-notice { padding: 8px 12px; border-radius: 8px; margin: 4px 0; }
.lg-info { background: #eef2ff; color: #1e1b4b; }
.lg-warning { background: #fef3c7; color: #451a03; }
.lg-error { background: #fee2e2; color: #450a0a; font-weight: 600; }
.lg-progress-text { margin-bottom: 6px; }
.lg-progress-text span { color: #4b5563; margin-left: 8px; }
.lg-bar { height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; }
.lg-bar > div { height: 100%; background: #4f46e5; transition: width 0.5s; }
.lg-checks ul { margin: 4px 0 0 0; padding-left: 4px; list-style: none; }
.lg-card { border: 1px solid #e5e7eb; border-radius: 8px; padding: 6px; }
.lg-pixelated img { width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated; }
.lg-card-space { visibility: hidden; }
.lg-card-note .lg-notice { margin: 4px 0 0 0; font-size: 0.9em; font-weight: normal; }
.lg-pixels img { image-rendering: pixelated; min-width: 256px; min-height: 256px; object-fit: contain; }
.lg-previews img { image-rendering: pixelated; }
.lg-previews .thumbnail-item { min-width: 256px; min-height: 256px; }
#run-previews .grid-container { grid-template-columns: repeat(3, minmax(256px, 1fr)) !important; }
"""


def build_app(runs_dir: Path, jobs: JobManager | None = None, users: tuple[str, ...] = ()) -> tuple[gr.Blocks, Ctx]:
    """The whole page. The JobManager (given, or made as the engine loads) is what every visitor's tab reads;
    `users`: the --auth user names, each of whom sees only their own runs when there are several."""
    ctx = _context(Path(runs_dir).resolve(), jobs, users if len(users) > 1 else ())
    for name in record_interrupted(ctx.runs_dir, is_live=ctx.engine.is_live):
        log.warning("Run %s was left unfinished when the app last stopped; it is marked interrupted", name)
    expire_old(ctx)
    # What the browser keeps is encrypted with a key kept beside the runs, so it still reads after a restart.
    browser_key = app_secret(ctx.runs_dir)
    # Gradio keeps every upload and every file handed to a page in its cache. On a Space they are dropped a day
    # later (the pictures are in the staging folders by then, and a page asks for its files again), so the disk
    # that strangers share does not fill with them.
    delete_cache = (CACHE_SECONDS, CACHE_SECONDS) if ctx.on_space else None
    with gr.Blocks(title="LoRA trainer", delete_cache=delete_cache) as demo:
        ctx.add(
            {
                # Who this page's visitor is (owners.py), set when the page loads; every handler is told.
                "owner": gr.State(""),
                # The secret that makes an anonymous visitor the owner of their runs; only its hash leaves the page.
                "owner_key": gr.BrowserState("", storage_key="lora_gui_owner", secret=browser_key),
                # The staging folder's id, remembered by the browser so a reload finds the same pictures.
                "session": gr.State(""),
                "remembered": gr.BrowserState("", storage_key="lora_gui_dataset", secret=browser_key),
                # Presets a visitor saves where visitors are strangers: kept by their browser, never by the server.
                "my_presets": gr.BrowserState({}, storage_key="lora_gui_presets", secret=browser_key),
                "dataset_version": gr.State(0),
                "timer": gr.Timer(POLL_SECONDS),
            }
        )
        _build_header(ctx)
        _build_tabs(ctx)
        wire_dataset_tab(ctx)
        wire_train_tab(ctx)
        wire_generate_tab(ctx)
        wire_runs_tab(ctx)
        _wire_page(ctx, demo)
    return demo, ctx


def _context(runs_dir: Path, jobs: JobManager | None, users: tuple[str, ...]) -> Ctx:
    """The page's wiring and the services its handlers call, for this server's environment."""
    space = on_space()
    limits = Limits.from_environment(space)
    models = ModelChoices(runs_dir, allow_paths=paths_allowed(space), on_space=space)
    engine = Engine(policy=lambda: models.policy, given_jobs=jobs)
    return Ctx(
        on_space=space,
        users=users,
        sign_in=sign_in_available(),
        runs_dir=runs_dir,
        limits=limits,
        engine=engine,
        models=models,
        folders=Folders(runs_dir, limits, engine),
        captioning=Captioning(runs_dir, engine, models),
    )


def _build_header(ctx: Ctx) -> None:
    """The title, what the app does, the demo button, the sign-in button, and the engine's loading notice."""
    with gr.Row():
        gr.Markdown(
            "# LoRA trainer\nTeach Stable Diffusion, Flux or Z-Image a face, an object or a style from your own "
            "pictures: **1** add pictures, **2** train, **3** try it. First time? Try the demo: it teaches a small "
            "model a shape it never saw, with no download, and your own pictures are kept; the edit demo teaches its "
            "kin an edit (a shape turned pink where it stands) from before/after pictures. The Train tab says how "
            "long training takes on this computer."
        )
        with gr.Column(scale=0, min_width=180):
            # The page's one loud button while there are no pictures (ui/dataset.show_set quietens it after).
            ctx.add({"try_demo": gr.Button("Try the demo", variant="primary", min_width=160, elem_id="try-demo")})
            ctx.add(
                {
                    "try_edit_demo": gr.Button(
                        "Try an edit demo", variant="secondary", size="sm", min_width=160, elem_id="try-edit-demo"
                    )
                }
            )
            if ctx.sign_in:  # a Space with hf_oauth: runs follow the account, and pushing needs no token
                gr.LoginButton()
    ctx.add(
        {"engine_loading": gr.HTML(notice(ENGINE_LOADING), visible=not ctx.engine.loaded, elem_id="engine-loading")}
    )


def _build_tabs(ctx: Ctx) -> None:
    with gr.Tabs() as tabs:
        ctx.add({"tabs": tabs})
        with gr.Tab("Dataset", id="dataset"):
            ctx.add(build_dataset_tab(ctx))
            build_findings(ctx)
            build_dataset_grid(ctx)
        with gr.Tab("Train", id="train"):
            ctx.add(build_train_tab(ctx))
        with gr.Tab("Generate", id="generate") as generate_tab:
            ctx.add({"generate_tab": generate_tab, **build_generate_tab(ctx)})
        with gr.Tab("Runs", id="runs") as runs_tab:
            ctx.add({"runs_tab": runs_tab, **build_runs_tab(ctx)})


def _wire_page(ctx: Ctx, demo: gr.Blocks) -> None:
    """What belongs to no one tab: the demo button, and a page opened or reloaded."""
    settings = config_form.field_names()
    for button, handler in (("try_demo", try_demo), ("try_edit_demo", try_edit_demo)):
        ctx.wire(
            ctx[button].click,
            handler,
            ["session", "dataset_version"],
            [
                "session",
                "remembered",
                "dataset_version",
                "report",
                "page",
                "dataset_notice",
                "base_model",
                "preset",
                "train_notice",
                "tabs",
                *settings,
            ],
            api_name=button,
            engine_free=True,  # drawn pictures and saved settings: the demo is ready before the engine is
        )
    ctx.wire(
        demo.load,
        restore,
        ["owner_key", "remembered", "my_presets", "dataset_version", "resolution", "default_caption"],
        [
            "owner",
            "owner_key",
            "session",
            "dataset_version",
            "report",
            "page",
            "preset",
            "run_name",
            "base_model",
            *settings,
        ],
        api_visibility="private",
        engine_free=True,  # who the visitor is and their pictures; a run's settings only once the engine is loaded
    )
    ctx.wire(demo.load, show_estimate, ["base_model", *settings], ["estimate"], api_visibility="private")
    ctx.wire(
        demo.load, engine_ready, [], ["engine_loading", "cpu_warning"], api_visibility="private", show_progress="hidden"
    )


def engine_ready(ctx: Ctx) -> dict[str, Any]:
    """Once the engine has loaded: its notice goes, and without a GPU, the warning that training runs on the
    processor shows."""
    return {"engine_loading": gr.update(visible=False), "cpu_warning": gr.update(visible=not ctx.engine.has_cuda)}


@dataclass(frozen=True)
class _Demo:
    """What a demo button puts in: drawn pictures (and their before pictures), a base model and its settings, and
    what the page says of them."""

    draw: Callable[[Path], object]  # draws the pictures into a folder (pairs: its before/ and after/)
    config: TrainConfig
    base_model: str
    preset: str
    pictures_notice: str
    train_notice: str


def try_demo(ctx: Ctx, visitor: Visitor, session: str, dataset_version: int) -> dict[str, Any]:
    """The demo's drawn pictures of a concept the demo model never saw, in a folder of their own beside the
    visitor's pictures (kept, one click away), the demo model and the demo preset: one click on Start away."""
    return _stage_demo(
        ctx,
        visitor,
        session,
        dataset_version,
        _Demo(
            draw=lambda folder: write_demo_concept(folder, count=DEMO_IMAGES),
            config=demo_config(),
            base_model=TINY_CHOICE,
            preset=DEMO_PRESET,
            pictures_notice=f"The demo's {DEMO_IMAGES} pictures are in: a pink cross, called {TRIGGER} in their "
            "captions. The demo model draws circles, squares and triangles in a few colours, and has never seen "
            "either.",
            train_notice="Demo ready: the demo model and quick settings are filled in. Press Start training (the "
            "time it takes on this computer is shown above it): the previews of "
            f'"{concept_caption(CONCEPT_BACKGROUNDS[0])}" turn into a pink cross, and the Generate tab shows it '
            "beside the demo model's own picture.",
        ),
    )


def try_edit_demo(ctx: Ctx, visitor: Visitor, session: str, dataset_version: int) -> dict[str, Any]:
    """The edit demo: drawn before/after pairs (a coloured shape, then the same shape turned pink where it stands),
    the edit demo's model (the demo model's Kontext kin) and its preset, as the demo is set up."""
    model = ctx.models.tiny_model(EDIT_DEMO_FAMILY)
    return _stage_demo(
        ctx,
        visitor,
        session,
        dataset_version,
        _Demo(
            draw=lambda folder: write_demo_edit_pairs(folder / "after", folder / "before", count=EDIT_DEMO_PAIRS),
            config=demo_edit_config(model=model),
            base_model=EDIT_DEMO_CHOICE,
            preset=DEMO_EDIT_PRESET,
            pictures_notice=f"The edit demo's {EDIT_DEMO_PAIRS} before/after pairs are in: each after picture is "
            f'its before picture with the shape turned pink where it stands, captioned "{EDIT_CAPTION}".',
            train_notice="Edit demo ready: the edit demo's model and quick settings are filled in. Press Start "
            "training: the previews, a held-out before picture beside its edit, turn the shape pink on its own "
            "side, and the Generate tab edits a picture of yours (Picture to edit) with and without the LoRA.",
        ),
    )


def _stage_demo(ctx: Ctx, visitor: Visitor, session: str, dataset_version: int, demo: _Demo) -> dict[str, Any]:
    """A demo's pictures in a staging folder of their own beside the visitor's pictures (kept, one click away),
    its model and its settings: one click on Start away."""
    own = ctx.folders.own(session, visitor)
    staging = ctx.folders.demo(session, visitor)
    # Drawn aside and added as dropped pictures are, so they count in the visitor's quota like any others.
    with tempfile.TemporaryDirectory() as drawn:
        demo.draw(Path(drawn))
        left_out = staging.import_folder(drawn)
    if left_out:  # the demo is all its pictures or none: a part of it would teach less than it promises
        staging.delete()
        shown = own.session_id if own is not None else ""
        return {
            "session": shown,
            "remembered": shown,
            "dataset_version": (dataset_version or 0) + 1,
            "dataset_notice": notice(
                "The demo's pictures were not added, as not all of them fit. " + " ".join(left_out), "error"
            ),
        }
    mine = len(own.items()) if own is not None else 0
    kept = f" Your own {mine} picture{'s are' if mine != 1 else ' is'} kept: Back to my pictures returns to them."
    kept = kept if mine else ""
    config = demo.config
    return {
        "session": staging.session_id,
        "remembered": staging.session_id,
        "dataset_version": (dataset_version or 0) + 1,
        "report": checks_html(ctx, visitor, staging.session_id, config.resolution, config.default_caption),
        "page": pages_update(staging),
        "dataset_notice": notice(demo.pictures_notice + kept),
        "base_model": demo.base_model,
        "preset": demo.preset,
        "train_notice": notice(demo.train_notice + kept),
        "tabs": gr.Tabs(selected="train"),
        **config_form.widget_values(config),
    }


def restore(
    ctx: Ctx,
    visitor: Visitor,
    owner_key: str,
    remembered: str,
    my_presets: dict[str, Any],
    dataset_version: int,
    resolution: float,
    default_caption: str,
) -> dict[str, Any]:
    """A page opened (or reloaded): who its visitor is, from the secret their browser keeps (a new one the first
    time); the settings of their run queued or training now (the one the Train tab shows live); and the
    pictures this browser had added, if they are still on the server. An ended run's settings are not filled in:
    they may be the ones that failed, and a page opened later starts from the defaults or a preset."""
    owner_key = owner_key if isinstance(owner_key, str) and len(owner_key) >= 32 else new_secret()
    owner = anonymous(owner_key) if ctx.shared and not ctx.users else ""
    visitor = visitor.known_in_this_browser_as(owner) if owner else visitor
    updates: dict[str, Any] = {
        "owner": owner,
        "owner_key": owner_key,
        "preset": preset_menu(ctx, my_presets),
        "run_name": ctx.folders.suggest_run_name(visitor),
    }
    job = ctx.engine.jobs.latest(visitor) if ctx.engine.loaded else None  # no run starts before the engine loads
    if job is not None and not job.done.is_set():
        config = job.config
        resolution, default_caption = config.resolution, config.default_caption
        updates.update(base_model=ctx.models.label(config.base_model), **config_form.widget_values(config))
    staging = Staging.find(ctx.runs_dir, remembered, visitor)
    if staging is None:
        return updates
    return {
        **updates,
        "session": staging.session_id,
        "dataset_version": (dataset_version or 0) + 1,
        "report": checks_html(ctx, visitor, staging.session_id, resolution, default_caption),
        "page": pages_update(staging),
    }


def expire_old(ctx: Ctx) -> None:
    """Delete the staged pictures and the ended runs older than this server keeps them (limits.py)."""
    for session in expire_staging(ctx.runs_dir, ctx.limits):
        log.info("Deleted the staged pictures %s: untouched for %s days", session, ctx.limits.staging_days)
    for name in expire_runs(ctx.runs_dir, ctx.limits, is_live=ctx.engine.is_live):
        log.info("Deleted the run %s: ended more than %s days ago", name, ctx.limits.run_days)


def launch(
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    auth: str = "",
    runs_dir: str = "",
) -> None:
    """Start the app. Host and port default to Gradio's ($GRADIO_SERVER_NAME / _PORT, which Spaces sets). `auth`:
    USER:PASS, or several separated by commas, each of whom then sees only their own runs."""
    credentials = parse_auth(auth)
    grace_seconds = shutdown_seconds()
    stop_signal = _catch_stop_signals()
    folder = Path(runs_dir) if runs_dir else default_runs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    demo, ctx = build_app(folder, users=tuple(user for user, _ in credentials or []))
    log.info("Runs are saved in %s", folder.resolve())
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=credentials,
        # No allowed_paths: a run's files reach the page only as copies its owner's handlers hand out (served).
        max_file_size=ctx.limits.max_file_bytes,
        app_kwargs={"middleware": [Middleware(UploadRoom, limit=ctx.limits.max_upload_folder_bytes)]},
        css=CSS,
        footer_links=["api"],
        # Server-side rendering runs a Node server whose signal handlers exit at once; the page renders in
        # the browser, and SIGTERM is ours, to let the run save.
        ssr_mode=False,
        prevent_thread_lock=True,
        # Gradio's own lines name its Python arguments (`share=True` in `launch()`); ours name the app's flags.
        quiet=True,
    )
    print(f"The LoRA trainer is open at {demo.local_url} (stop it with Ctrl+C).", flush=True)
    if not share and not ctx.on_space:
        print("To open it from another computer: python app.py --share (a public link) or --host 0.0.0.0.", flush=True)
    # The page answers now; the engine loads after it, not beside it (importing holds Python's one lock, and would
    # hold the server's start back as long), its CPU threads set before anything computes.
    ctx.engine.start(leave_a_core_free=True).join()
    print("The trainer has loaded: training and Generate are ready.", flush=True)
    # Everything the app uses is imported and built, and lives as long as it does: leave those objects out of later
    # garbage collections, which otherwise walk them all (0.4 s at the end of each run and each model swap, and in
    # Python's own full collections during a run).
    gc.freeze()
    try:
        while not stop_signal.wait(EXPIRY_SECONDS):
            expire_old(ctx)
    finally:
        if ctx.engine.jobs.active() is not None:
            print(f"Stopping the runs: the one training saves after its current step (up to {grace_seconds:.0f} s)")
        ctx.engine.jobs.close(timeout=grace_seconds)
        demo.close()


class UploadRoom:
    """Refuses an upload to Gradio's upload route while its folder is full (limits.make_upload_room), before the
    upload is read: Gradio itself checks only each file's size, and keeps what it was sent for a day."""

    def __init__(self, app: Any, limit: int | None):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        upload = scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/gradio_api/upload")
        if upload and self.limit is not None:
            folder = Path(gradio_utils.get_upload_folder())
            if not await anyio.to_thread.run_sync(make_upload_room, folder, self.limit):
                refused = PlainTextResponse(
                    "The server holds as many uploads as it can right now; try again in a few minutes.", status_code=429
                )
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)


def parse_auth(auth: str) -> list[tuple[str, str]] | None:
    """--auth's USER:PASS pairs, separated by commas."""
    if not auth:
        return None
    credentials = []
    for pair in auth.split(","):
        user, _, password = pair.strip().partition(":")
        if not user or not password:
            raise ConfigError(
                "--auth must be USER:PASS (or several: ann:secret1,bob:secret2), for example --auth me:secret"
            )
        credentials.append((user, password))
    if len({user for user, _ in credentials}) < len(credentials):
        raise ConfigError("--auth names a user twice; give each user one password")
    return credentials


def _catch_stop_signals() -> threading.Event:
    """An event set by SIGTERM (Docker, Spaces) or SIGINT (Ctrl+C), which would otherwise end the process
    mid-step; a second signal ends it at once."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def shutdown_seconds() -> float:
    """The time a run is given to stop when the app is asked to exit, from $LORA_GUI_SHUTDOWN_SECONDS."""
    value = os.environ.get(SHUTDOWN_SECONDS_VARIABLE, "")
    try:
        return float(value) if value else DEFAULT_SHUTDOWN_SECONDS
    except ValueError:
        raise ConfigError(f"${SHUTDOWN_SECONDS_VARIABLE} must be a number of seconds, not {value!r}") from None
