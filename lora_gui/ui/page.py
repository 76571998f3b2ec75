"""The page's wiring: every component by name, events connected to handlers that take and return dicts, and who is
asking, worked out for every event."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from lora_gui.owners import EVERYONE, Visitor, anonymous, signed_in, user


def on_space() -> bool:
    """Whether the app runs as a Hugging Face Space, where visitors are strangers to the server."""
    return bool(os.environ.get("SPACE_ID"))


def sign_in_available() -> bool:
    """Whether visitors can sign in with Hugging Face: a Space whose README asks for it (hf_oauth: true), which
    gives the app its OAuth client. Gradio's own test for a Space is SYSTEM=spaces."""
    return os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("OAUTH_CLIENT_ID"))


@dataclass(kw_only=True)
class Page:
    """Every tab's components by name, and the one way events reach handlers (`wire`)."""

    on_space: bool = False
    users: tuple[str, ...] = ()  # the --auth users, when there are several: each sees only their own runs
    sign_in: bool = False  # visitors sign in with Hugging Face (a Space with hf_oauth)
    components: dict[str, gr.components.Component] = field(default_factory=dict)

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
        engine_free: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Connect an event to `handler(ctx, **values_by_name) -> {name: new value}`.

        Handlers see and return plain dicts keyed by component name, never long positional lists;
        the names are also the parameter names of the app's API (gradio_client). A handler that
        `reports_progress` also gets `progress`, Gradio's progress bar over its outputs. An `engine_free` one
        (pictures and captions on disk: nothing it calls imports an ML library) runs at once while the engine
        loads, where every other event waits for it (`before_handling`).
        """
        wants_visitor = "visitor" in inspect.signature(handler).parameters

        def call(
            request: gr.Request, profile: Any = None, token: Any = None, progress: Any = None, *, values: dict[str, Any]
        ) -> Any:
            # Who is asking is worked out here, for every event, from what the caller can't forge: the
            # server-side session, the sign-in cookie, the --auth login. Never from the page.
            visitor = self.visitor(request, values.pop("owner", ""), profile, token)
            extra = {"visitor": visitor} if wants_visitor else {}
            if not engine_free:
                self.before_handling()
            return handler(self, **values, **extra, **({"progress": progress} if reports_progress else {}))

        # Gradio hands the special values (the request, the sign-in, its progress bar) first, by position.
        def run(*special: Any, **values: Any) -> Any:
            return self._shown(call(*special, values=values), outputs)

        def run_steps(*special: Any, **values: Any) -> Any:  # a long task, showing how far it got as it goes
            for result in call(*special, values=values):
                yield self._shown(result, outputs)

        target = run_steps if inspect.isgeneratorfunction(handler) else run
        components = {**{name: self.components[name] for name in inputs}, **(extra_inputs or {})}
        if "owner" in self.components:  # the page's owner id, set when it loads (a test's bare page has none)
            components.setdefault("owner", self.components["owner"])
        target.__signature__ = _signature(components, reports_progress)  # type: ignore[attr-defined]
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

    def before_handling(self) -> None:
        """What every event waits for before its handler runs: nothing, for a bare page."""

    def _shown(self, result: dict[str, Any], outputs: list[str]) -> Any:
        """A handler's dict as Gradio's outputs."""
        if not result:  # Gradio reads an empty dict as one output's value, not as "no change"
            return gr.skip() if len(outputs) == 1 else tuple(gr.skip() for _ in outputs)
        return {self.components[name]: value for name, value in result.items()}

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


def _signature(components: dict[str, Any], reports_progress: bool) -> inspect.Signature:
    """The signature Gradio reads a wired function's inputs from: the special values first, then each component by
    name.

    Gradio's API makes a parameter optional when the component starts with a value, or when the function's own
    parameter defaults to None: so an empty file or menu may be left out of a call too. It fills leading parameters
    by their types: the request, the signed-in visitor and their token, and its progress bar where the parameter's
    default is one."""
    parameters = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None if getattr(component, "value", None) is None else inspect.Parameter.empty,
        )
        for name, component in components.items()
    ]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    special = [
        inspect.Parameter("request", positional),
        inspect.Parameter("oauth_profile", positional, default=None),
        inspect.Parameter("oauth_token", positional, default=None),
    ]
    if reports_progress:
        special.append(inspect.Parameter("progress", positional, default=gr.Progress()))
    return inspect.Signature(special + parameters)
