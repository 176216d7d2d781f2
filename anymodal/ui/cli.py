"""``anymodal serve``: its arguments and its run function; starlette and uvicorn are imported only when it runs."""

from __future__ import annotations

import argparse
import sys

from ..commands import add_model_args, load_pipeline


def serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name the server answers to besides localhost, 127.0.0.1, ::1 and --host (repeat "
                        "for more; '*' for any: unsafe, it allows DNS rebinding). Requests naming another host "
                        "in their Host header are refused")
    p.add_argument("--seed", type=int, default=0, help="seed of each session's first reply (default 0)")
    p.add_argument("--media-dir", default=None,
                   help="where uploads, generated media and saved sessions are kept; a server restarted on the "
                        "same directory carries on its sessions (default: a new temporary directory)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens the LLM may generate per reply (default: the model's llm.max_new_tokens)")


def check_port(host: str, port: int) -> None:
    """Raise ``OSError`` (one line) if ``host:port`` cannot be bound, e.g. another server holds it: checked
    before the model loads, so a busy port costs no wait and the URL is never printed."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot bind to --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
        try:
            sock.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server may be using it; "
                          f"choose another with --port)") from None


def serve_command(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as e:
        print(f"anymodal serve: error: the web UI needs extra packages ({e.name}); "
              'install them with: pip install "anymodal[ui]"', file=sys.stderr)
        return 2
    check_port(args.host, args.port)
    pipe = load_pipeline(args.model, args.config, args.device)
    serve(pipe, host=args.host, port=args.port, seed=args.seed, media_dir=args.media_dir,
          max_new_tokens=args.max_new_tokens, allowed_hosts=args.allowed_host)
    return 0
