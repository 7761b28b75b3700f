"""``rmae dashboard --runs DIR [--port N] [--host 127.0.0.1] [--device auto]`` (an ``rmae.commands`` plugin).

- **The server is this process.** ``rmae dashboard`` replaces itself with the Streamlit server
  (``os.execv``), so whatever stops the command — SIGTERM from a supervisor or ``kill PID``,
  SIGINT from Ctrl-C — reaches the server itself, which shuts down (Streamlit's own signal
  handlers), ends its background analyses (:mod:`dashboards.jobs`) and frees the port. No
  parent is left to die alone and orphan the server.
- **Origin and Host of the WebSocket** are checked by Streamlit's own settings:
  ``server.enableCORS`` (a WebSocket whose ``Origin`` is another site is refused: HTTP 403 on the
  handshake) and ``server.allowedHosts`` (one whose ``Host`` is not a name of the address served
  is refused: a DNS-rebinding page, whose ``Host`` and ``Origin`` are its own domain, gets 403
  too); ``server.enableXsrfProtection`` guards uploads. See :func:`allowed_hosts`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from rmae.device import DEVICE_FORMS, DeviceError, resolve_device

from .images import MAX_UPLOAD_BYTES

APP = Path(__file__).with_name("app.py")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def allowed_hosts(host: str) -> list[str]:
    """Host names a browser may use to reach a server bound to ``host`` (``server.allowedHosts``):
    the loopback names for a loopback address, that address and the loopback names for any other
    specific one, and ``[]`` (any Host: Streamlit's default) for a wildcard (``0.0.0.0``, ``::``),
    whose reachable names cannot be known — :func:`run` warns about it."""
    if host in ("0.0.0.0", "::", ""):
        return []
    return list(dict.fromkeys([host, *LOOPBACK_NAMES])) if not _is_loopback(host) else list(LOOPBACK_NAMES)


def build_command(runs: str | Path, port: int = 8501, host: str = "127.0.0.1", device: str = "auto") -> list[str]:
    """The ``streamlit run`` command line (headless, no usage statistics, no file watcher, Origin
    and Host checked on the WebSocket)."""
    hosts = [word for h in allowed_hosts(host) for word in ("--server.allowedHosts", h)]
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        # a foreign Origin is refused on the WebSocket; a foreign Host (DNS rebinding) too
        "--server.enableCORS", "true",
        "--server.enableXsrfProtection", "true",
        *hosts,
        # Streamlit's own limit (MiB) stops oversize uploads before they reach the app, which
        # checks bytes and decoded pixels again.
        "--server.maxUploadSize", str(max(1, MAX_UPLOAD_BYTES // 2**20)),
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--theme.base", "light",
        "--", "--runs", str(runs), "--device", device,
    ]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Check the arguments (exit status 2 on a bad one), then become the Streamlit server."""
    runs = Path(args.runs).expanduser()
    if not runs.is_dir():
        print(f"rmae dashboard: --runs {args.runs}: not a folder. Point it at the folder holding your run "
              "folders (e.g. the output of `rmae demo`).", file=sys.stderr)
        return 2
    try:
        device = str(resolve_device(args.device))
    except DeviceError as e:
        print(f"rmae dashboard: error: {e}", file=sys.stderr)
        return 2
    port = args.port if args.port else free_port(args.host)
    if not _is_loopback(args.host):
        print(f"rmae dashboard: warning: serving on {args.host}, reachable from other machines; the dashboard "
              "has no authentication.", file=sys.stderr)
    if not allowed_hosts(args.host):
        print("rmae dashboard: warning: a wildcard address accepts any Host header (no DNS-rebinding check); "
              "pass --host with the address you browse to.", file=sys.stderr)
    cmd = build_command(runs.resolve(), port, args.host, device)
    print(f"rmae dashboard: runs root {runs.resolve()}\n  open http://{args.host}:{port}  (Ctrl-C stops it)", flush=True)
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # the server replaces this process (never returns): signals sent to it reach it


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dashboard", help="open the attention explorer (Streamlit) on a folder of runs",
        description="Start the Streamlit attention explorer on loopback. It reads only run folders under --runs.")
    p.add_argument("--runs", required=True, help="folder holding run folders (e.g. the output of `rmae demo`)")
    p.add_argument("--port", type=int, default=8501, help="port (0 = any free port; default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--device", default="auto", help=f"where the models run: {DEVICE_FORMS} (default auto: CUDA, "
                   "else MPS, else CPU)")
    p.set_defaults(func=run)


def demo_hook(runs: dict[str, Path], out: Path) -> list[str]:
    """``rmae demo``'s last step (entry-point group ``rmae.demo``): the command that opens the
    dashboard on the demo runs."""
    import shlex

    root = Path(out).resolve()
    return [f"dashboard: rmae dashboard --runs {shlex.quote(str(root))}   (then open http://127.0.0.1:8501)"]
