"""Which base models a server takes from whoever names one: anything on one's own computer; on a public Space,
Hub ids only (what a visitor typed is never looked up on the server's disk), an allow-list of them, and a
download size limit. No torch here: the app checks a name before anything loads."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora_gui.downloads import HubToken, check_download_size
from lora_gui.errors import ModelLoadError

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# The one answer a hub-only server gives to anything but a Hub id, whatever exists on its disk: a message that
# differed by what is there would let a stranger map the server's files.
HUB_IDS_ONLY = "on this Space, a base model is a Hugging Face Hub id such as owner/name"


def is_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a Hugging Face Hub id (owner/name) rather than a local path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


@dataclass(frozen=True)
class BaseModelPolicy:
    """Which base models a server takes from whoever names one. By default anything: a folder or file on this
    computer first, else a Hub id. A public Space passes `hub_only`, so what a visitor typed is never looked up
    as one of its paths. `allowed` (when not empty) limits the Hub ids; `max_bytes` limits a download's size."""

    hub_only: bool = False
    allowed: tuple[str, ...] = ()
    max_bytes: int | None = None
    own: tuple[str, ...] = ()  # the server's own models (the app's tiny ones), by path: always taken

    def check_name(self, source: str) -> None:
        """Refuse a name this server does not take, from the name alone."""
        if self.hub_only and not is_hub_id(source) and source not in self.own:
            raise ModelLoadError(HUB_IDS_ONLY)
        if self.allowed and is_hub_id(source) and source.lower() not in map(str.lower, self.allowed):
            offered = ", ".join(self.allowed)
            raise ModelLoadError(f"{source} is not one of the base models this server offers: {offered}")

    def looks_on_disk(self, source: str) -> bool:
        """Whether `source` may be looked up as one of this server's folders or files."""
        return not self.hub_only or source in self.own

    def check_hub_model(self, repo_id: str, token: HubToken = None) -> None:
        """Refuse a Hub model by its name, or by its download's size, read from the Hub before any file is fetched."""
        self.check_name(repo_id)
        if self.max_bytes is not None:
            check_download_size(repo_id, self.max_bytes, token)


ANY_BASE_MODEL = BaseModelPolicy()
