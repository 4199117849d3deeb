"""``flops login``'s configuration: the manager's URL and the user's token, in
``$XDG_CONFIG_HOME/flops/login.json`` (default ``~/.config/flops/login.json``, mode 0600).

The CLI's options and their environment variables (``FLOPS_MANAGER_URL``, ``FLOPS_API_TOKEN``)
override what is stored here.
"""

import json
import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from flops_utils.logging import logger


class Login(BaseModel):
    """What ``flops login`` stores: the manager's base URL and the bearer token."""

    manager_url: str = ""
    token: str = ""


def login_path() -> Path:
    """Where the login is stored."""
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "flops" / "login.json"


def read_login() -> Login:
    """The stored login; an empty one when there is none or it cannot be read (logged)."""
    path = login_path()
    try:
        return Login.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        return Login()
    except (OSError, ValueError, ValidationError):
        logger.warning("ignoring %s: not a flops login file; run flops login again", path.name)
        return Login()


def write_login(login: Login) -> Path:
    """Store ``login`` (directory 0700, file 0600, replaced atomically); returns its path."""
    path = login_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(login.model_dump_json())
    os.replace(tmp, path)
    return path
