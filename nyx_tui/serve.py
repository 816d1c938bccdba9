"""`nyx serve`: the same TUI in a browser, through textual-serve.

Each browser tab that connects runs its own `python -m nyx_tui tui` (textual-serve's web driver speaks
to it over a pipe); jobs stay detached as always, so closing the tab or stopping the server ends only
the view. The TUI starts jobs and reads files, so whoever reaches the port holds a shell-equivalent:
the server binds 127.0.0.1 by default and refuses any other address unless `--public` says the user
means it. The way to reach it from a laptop is an SSH tunnel (`ssh -L`), which adds SSH's own auth.

textual-serve (and aiohttp under it) is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import re
import shlex
import socket
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
TITLE = "Nyx"
_HOST_HEADER = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def tunnel_recipe(port: int) -> str:
    return (
        f"from your laptop: ssh -L {port}:127.0.0.1:{port} user@this-box  "
        f"then open http://localhost:{port} in your browser"
    )


def tui_command() -> str:
    """The shell command textual-serve runs for each browser session (it uses a shell)."""
    return shlex.join([sys.executable, "-m", "nyx_tui", "tui"])


class HostError(ValueError):
    """The address cannot be served: the message says why and what to do."""


def loopback_only(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1). Raises HostError when
    the name does not resolve."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise HostError(f"{host!r} does not resolve ({e.strerror}); use 127.0.0.1") from e
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def refusal(host: str, port: int) -> str:
    return (
        f"refusing to serve on {host}: it is not a loopback address, so anyone who can reach port {port} "
        "gets the Nyx TUI with no password — a shell-equivalent (it starts jobs, reads and writes files).\n"
        f"Instead keep the default 127.0.0.1 and tunnel: {tunnel_recipe(port)}\n"
        "If the network in front of this box is yours (a VPN, a firewall, an authenticating proxy), "
        "pass --public to serve there anyway."
    )


def _free_port_near(host: str, port: int) -> int | None:
    for candidate in range(port + 1, min(port + 50, 65536)):
        if _port_problem(host, candidate) is None:
            return candidate
    return None


def _port_problem(host: str, port: int) -> OSError | None:
    """Try to bind (as aiohttp will, with SO_REUSEADDR) and let go at once: None when the port is free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return OSError(errno.EADDRNOTAVAIL, str(e.strerror))
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as e:
                return e
    return None


def port_message(host: str, port: int, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        near = _free_port_near(host, port)
        pick = f" (port {near} is free: --port {near})" if near else ""
        return (
            f"port {port} on {host} is already in use — another program listens there (an earlier `nyx serve`?).\n"
            f"Choose another port with --port{pick}, or stop that program (`ss -ltnp 'sport = :{port}'` shows it)."
        )
    if error.errno == errno.EACCES:
        return f"port {port} needs root (ports under 1024 are privileged): choose one above 1024 with --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine ({error.strerror}); use 127.0.0.1"
    return f"cannot listen on {host}:{port}: {error.strerror or error}"


def make_server(host: str, port: int, public_url: str | None = None, public: bool = False) -> Any:
    """A textual-serve Server for the Nyx TUI. Page URLs follow the Host the browser used, so a tunnel
    from another local port (`ssh -L 9000:127.0.0.1:8000`) still finds its websocket."""
    import aiohttp_jinja2
    from aiohttp import web
    from textual_serve.server import Server, to_int

    class NyxServer(Server):
        sessions: set[asyncio.Task[Any]] = set()  # noqa: RUF012 (one server per process)

        async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
            """textual-serve's session, tracked so that stopping the server ends it at once (aiohttp would
            otherwise wait for every open tab before it exits)."""
            task = asyncio.current_task()
            if task is not None:
                self.sessions.add(task)
            try:
                return await super().handle_websocket(request)
            finally:
                if task is not None:
                    self.sessions.discard(task)

        async def on_shutdown(self, app: web.Application) -> None:
            for task in list(self.sessions):
                task.cancel()  # textual-serve closes the websocket and asks its TUI to quit

        async def handle_index(self, request: web.Request) -> web.Response:
            base = self.public_url
            if public_url is None and _HOST_HEADER.match(request.host or ""):
                scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
                base = f"{'https' if scheme == 'https' else 'http'}://{request.host}"
            router = request.app.router
            static = f"{base}{router['static'].url_for(filename='/')}".rstrip("/") + "/"
            ws = f"{base}{router['websocket'].url_for()}"
            ws = ("wss:" if base.startswith("https") else "ws:") + ws.split(":", 1)[1]
            context = {
                "font_size": to_int(request.query.get("fontsize", "16"), 16),
                "app_websocket_url": ws,
                "config": {"static": {"url": static}},
                "application": {"name": self.title},
            }
            return aiohttp_jinja2.render_template("app_index.html", request, context)

        async def on_startup(self, app: web.Application) -> None:
            shown = public_url or f"http://{f'[{host}]' if ':' in host else host}:{port}"
            self.console.print(f"[bold]Nyx[/] in the browser: [link={shown}]{shown}[/]", highlight=False)
            if public:
                self.console.print(
                    f"[yellow]serving on {host} (--public)[/]: anyone who reaches port {port} controls Nyx",
                    highlight=False,
                )
            else:
                self.console.print(tunnel_recipe(port), highlight=False)
            self.console.print(
                "Each tab runs its own TUI; jobs keep running when a tab closes. Ctrl+C stops the server.",
                highlight=False,
            )

    return NyxServer(tui_command(), host=host, port=port, title=TITLE, public_url=public_url)


def cmd_serve(args: argparse.Namespace) -> int:
    host, port = args.host, args.port
    if not 0 < port < 65536:
        print(f"error: --port {port} is not a TCP port (1-65535)", file=sys.stderr)
        return EXIT_USAGE
    try:
        local = loopback_only(host)
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not local and not args.public:
        print(f"error: {refusal(host, port)}", file=sys.stderr)
        return EXIT_USAGE
    problem = _port_problem(host, port)
    if problem is not None:
        print(f"error: {port_message(host, port, problem)}", file=sys.stderr)
        return EXIT_FAILED
    server = make_server(host, port, public_url=args.public_url, public=not local)
    try:
        server.serve()
    except OSError as e:  # lost a race for the port after the check
        print(f"error: {port_message(host, port, e)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="the TUI in a web browser (textual-serve), on 127.0.0.1: reach it through ssh -L",
        description="Serve the Nyx TUI to a web browser. Each browser tab runs its own TUI; jobs stay detached. "
        "It listens on 127.0.0.1 only: from your laptop run "
        f"`ssh -L {DEFAULT_PORT}:127.0.0.1:{DEFAULT_PORT} user@this-box` and open http://localhost:{DEFAULT_PORT}. "
        "Another address (0.0.0.0, ::, a LAN IP) is refused without --public, because whoever reaches the "
        "port can start jobs and read files as you.",
    )
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument(
        "--public",
        action="store_true",
        help="allow a non-loopback --host; anyone who reaches the port controls Nyx (use a VPN or proxy with auth)",
    )
    serve.add_argument(
        "--public-url",
        help="the URL browsers use, behind a reverse proxy (default: the address the browser asked for)",
    )
    serve.set_defaults(func=cmd_serve)
