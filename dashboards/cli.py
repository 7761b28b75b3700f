"""``rmae dashboard --runs DIR [--port N] [--host 127.0.0.1] [--device auto]`` (an ``rmae.commands`` plugin)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import subprocess
import sys
from pathlib import Path

from rmae.device import DEVICE_FORMS, DeviceError, resolve_device

from .images import MAX_UPLOAD_BYTES

APP = Path(__file__).with_name("app.py")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def build_command(runs: str | Path, port: int = 8501, host: str = "127.0.0.1", device: str = "auto") -> list[str]:
    """The ``streamlit run`` command line (headless, no usage statistics, no file watcher)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
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
    cmd = build_command(runs.resolve(), port, args.host, device)
    print(f"rmae dashboard: runs root {runs.resolve()}\n  open http://{args.host}:{port}  (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


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
