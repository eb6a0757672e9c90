"""Bind policy: loopback without auth, destructive routes refused on a remote bind without auth (fix 3)."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
from dataclasses import dataclass

from .roles import is_destructive

logger = logging.getLogger(__name__)


def is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


def start_server_host(argv: list[str]) -> tuple[str | None, bool]:
    """(host, explicit) as ``monailabel start_server`` parsed ``argv``: its own parser, with the host's
    default taken out so that an explicit ``--host 0.0.0.0`` is told apart from the default 0.0.0.0.
    (None, False) when the process was not started by ``start_server``."""
    from monailabel.main import Main

    parser = Main(actions=("start_server",)).args_parser()
    for action in parser._actions:  # argparse keeps sub-commands here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            action.choices["start_server"].set_defaults(host=None)
    try:
        args, _ = parser.parse_known_args(argv[1:])
    except SystemExit:
        return None, False
    if getattr(args, "action", None) != "start_server":
        return None, False
    return (args.host, True) if args.host is not None else ("0.0.0.0", False)


def _uvicorn_configs() -> list:
    import uvicorn

    return [o for o in gc.get_objects() if isinstance(o, uvicorn.Config)]


@dataclass
class BindPolicy:
    host: str
    explicit: bool
    auth: bool

    @property
    def remote(self) -> bool:
        return not is_loopback(self.host)

    def refuses(self, method: str, path: str) -> bool:
        return self.remote and not self.auth and is_destructive(method, path)


def apply_bind_policy(argv: list[str], auth: bool) -> BindPolicy:
    """Decide where the server binds and what it refuses there; binds 127.0.0.1 when auth is off and
    no host was asked for. Raises RuntimeError when that cannot be ensured (the server then does not start)."""
    host, explicit = start_server_host(argv)
    configs = _uvicorn_configs()
    if host is None:  # not started by `monailabel start_server` (e.g. uvicorn directly): uvicorn's own host
        if len(configs) != 1:
            raise RuntimeError("MRAnnotator: cannot tell which address the server binds")
        return BindPolicy(host=str(configs[0].host), explicit=True, auth=auth)
    if not explicit and not auth:
        if len(configs) != 1:
            raise RuntimeError("MRAnnotator: auth is off and no --host was given; start with --host 127.0.0.1")
        configs[0].host = "127.0.0.1"
        logger.warning("MRAnnotator: auth is off and no --host was given: binding 127.0.0.1 only "
                       "(pass --host explicitly to serve other machines)")
        return BindPolicy(host="127.0.0.1", explicit=False, auth=auth)
    if not auth and not is_loopback(host):
        logger.warning(f"MRAnnotator: serving {host} without auth: DELETE, dataset download, logs and model "
                       "files are refused (enable MONAI_LABEL_AUTH_ENABLE to allow them to admins)")
    return BindPolicy(host=host, explicit=explicit, auth=auth)

