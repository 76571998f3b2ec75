"""Who owns a run or a staged dataset, for an app that strangers share (a Hugging Face Space, or an app started
with several `--auth` users).

Every run folder and staging folder records its owner in a hidden `.owner` file: `hf:<user>` for a visitor
signed in with Hugging Face, `user:<name>` for an `--auth` user, and for a visitor who is not signed in
`anon:<sha256 of a secret>`, the secret itself living only in that visitor's browser. A folder without the file
was made by the command line or by an app used by one person: its owner is LOCAL. The app turns each request
into a `Visitor`, and every handler asks it before it reads, shows or changes anything.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_gui.atomic import write_text_atomic

LOCAL = "local"
OWNER_FILE = ".owner"
APP_SECRET_FILE = ".app-secret"


def anonymous(secret: str) -> str:
    """The owner id of a visitor who is not signed in: a hash, so the folders never hold what proves ownership."""
    return "anon:" + hashlib.sha256(secret.encode()).hexdigest()


def signed_in(username: str) -> str:
    """The owner id of a visitor signed in with Hugging Face."""
    return f"hf:{username}"


def user(name: str) -> str:
    """The owner id of a user of an app started with several `--auth` users."""
    return f"user:{name}"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Visitor:
    """Who is asking: what new runs and datasets belong to, and which existing ones this visitor may see."""

    owner: str = LOCAL
    also: tuple[str, ...] = ()  # other ids this visitor holds: the anonymous one kept from before signing in
    sees_everything: bool = False  # the one user of an app nobody else uses
    hub_token: str | None = field(default=None, repr=False)  # from signing in with Hugging Face; never logged
    name: str = ""  # how the page greets them: a Hugging Face or --auth user name

    def owns(self, owner: str) -> bool:
        return self.sees_everything or owner in (self.owner, *self.also)

    def owns_folder(self, folder: Path) -> bool:
        return self.owns(read_owner(folder))

    def known_in_this_browser_as(self, anonymous_id: str) -> Visitor:
        """This visitor with the anonymous id their browser's secret gives: theirs if they are not signed in, and
        kept beside their account if they are, so what they made before signing in stays theirs."""
        if self.owner.startswith("anon:"):
            return replace(self, owner=anonymous_id)
        return replace(self, also=(anonymous_id,))


# The one user of an app that is not shared (and the command line, and tests): everything is theirs.
EVERYONE = Visitor(sees_everything=True)


def read_owner(folder: Path) -> str:
    try:
        return (Path(folder) / OWNER_FILE).read_text(encoding="utf-8").strip() or LOCAL
    except OSError:
        return LOCAL


def write_owner(folder: Path, owner: str) -> None:
    if owner != LOCAL:
        write_text_atomic(Path(folder) / OWNER_FILE, owner + "\n")


def app_secret(runs_dir: Path) -> str:
    """A random key made once and kept beside the runs, so what the app stores in browsers (encrypted with it)
    can still be read after a restart: a visitor who comes back finds their runs and pictures."""
    path = Path(runs_dir) / APP_SECRET_FILE
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    return secret
