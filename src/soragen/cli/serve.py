"""soragen serve: a web page for making videos (Gradio, the optional extra `soragen[serve]`).

The options are checked, and the host's safety rule applied, before Gradio is imported or the model
loaded; the page itself is soragen.cli.page, what a request does soragen.cli.studio.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from soragen.cli.app import check_writable, command, default_cache, model_dir, stderr
from soragen.cli.generate import DeviceOption, DtypeOption, LoraOption, ModelOption, _check_choices
from soragen.core.errors import SoragenError, UsageError

INSECURE_HELP = ("Serve a --host other than loopback without --auth: anyone who can reach the port can make videos "
                 "on this machine (its compute) and see every video this server made.")
MISSING_GRADIO = "soragen serve needs Gradio, an optional extra: pip install 'soragen[serve]'"


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only: localhost, 127.0.0.0/8, ::1."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(host: str, auth: Optional[str], insecure: bool) -> Optional[tuple[str, str]]:
    """(user, password) from --auth; a non-loopback --host without --auth or --insecure is refused."""
    if not host.strip():
        raise UsageError("--host is empty; give an address such as 127.0.0.1")
    if auth is not None:
        user, colon, password = auth.partition(":")
        if not colon or not user or not password:
            raise UsageError("--auth must be USER:PASSWORD, both non-empty")
        return user, password
    if not is_loopback(host) and not insecure:
        raise UsageError(f"--host {host} is reachable from other machines: give --auth USER:PASSWORD (or "
                         f"--insecure to serve it to anyone who can reach it)")
    return None


def check_port(host: str, port: int) -> None:
    """Fail before loading the model if the address cannot be bound (in use, or not this machine's)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UsageError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            raise SoragenError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio
    except ImportError:
        raise SoragenError(MISSING_GRADIO) from None
    return gradio


@command()
def serve(
    model: ModelOption = None,
    lora: LoraOption = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port to serve on.")] = 7860,
    host: Annotated[str, typer.Option(help="The address to serve on; other than loopback (127.0.0.1, ::1, "
                                      "localhost) it needs --auth or --insecure.")] = "127.0.0.1",
    auth: Annotated[Optional[str], typer.Option(envvar="SORAGEN_AUTH", help="USER:PASSWORD: the page asks for "
                                                "them (or set SORAGEN_AUTH, which ps does not show).",
                                                show_default=False, show_envvar=False)] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    out: Annotated[Optional[Path], typer.Option(help="Where the videos and history.jsonl are kept (default: "
                                                "~/.cache/soragen/serve).", show_default=False)] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Serve a web page for making videos: prompt, settings, progress, the video, and a gallery of
    earlier ones. The model is loaded once; requests run one at a time.

    Examples:

      soragen serve

      soragen serve --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --lora runs/corgi --port 8000

      soragen serve --host 0.0.0.0 --auth alice:secret
    """
    credentials = check_access(host, auth, insecure)
    _check_choices(device=device, dtype=dtype)
    out = out or default_cache() / "serve"
    check_writable(out)
    check_port(host, port)
    gr = import_gradio()
    studio = _studio(model, lora, device, dtype, out)
    from soragen.cli.page import CSS, Page
    from soragen.io.image import MAX_BYTES
    pipe = studio.pipe
    name = "the built-in model" if model is None else f"`{pipe.model.path}`"
    title = f"{name} on {pipe.device} in {str(pipe.dtype).replace('torch.', '')}"
    demo = Page(studio, title).build()
    demo.queue(default_concurrency_limit=1)
    stderr().print(f"serving {pipe.model.path} at http://{host}:{port} (videos in {out}); Ctrl+C stops")
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts fetched
    demo.launch(server_name=host, server_port=port, auth=credentials, share=False, quiet=True, show_error=False,
                allowed_paths=[str(studio.videos)], max_file_size=MAX_BYTES, ssr_mode=False, pwa=False,
                mcp_server=False, footer_links=[], theme=theme, css=CSS)


def _studio(model, lora, device, dtype, out):
    """The model loaded once, with the LoRAs given at start (each merged at its weight, reweighed per
    request)."""
    from soragen.cli.studio import Lora, Studio
    from soragen.io.lora_file import parse, parse_expert, resolve_file
    from soragen.pipeline import Pipeline
    loras = []
    for spec, expert in map(parse_expert, lora or []):
        path, weight = parse(spec)
        loras.append(Lora(resolve_file(path), weight, expert))
    pipe = Pipeline.load(model_dir(model), device=device, dtype=dtype)
    return Studio(pipe, out, loras)
