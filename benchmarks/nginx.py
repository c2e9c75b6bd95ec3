"""Debian's nginx in front of local replicas, started from the shipped deploy/nginx config.

Shared by tests/test_replicas.py and `tandem bench replicas`, so the config operators copy
is the one that is tested and measured.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import grpc

# The checkout this module runs from (resolved through tandem/benchmarks, a link); an
# installed wheel has no checkout around it, and then the working directory is tried.
ROOT = Path(__file__).resolve().parent.parent
CONFIG_PATH = Path("deploy") / "nginx" / "tandem.conf"
# Where `make nginx` unpacks Debian's package (no root, no service started).
UNPACKED = ROOT / ".cache" / "nginx" / "usr" / "sbin" / "nginx"


class NginxMissing(RuntimeError):
    """No nginx binary (`make nginx` unpacks Debian's), or no shipped config to run it with."""


def find_config(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """The shipped deploy/nginx/tandem.conf: ``TANDEM_NGINX_CONFIG``, else the checkout's,
    else the working directory's."""
    environ = os.environ if environ is None else environ
    candidates = [ROOT / CONFIG_PATH, (cwd or Path.cwd()) / CONFIG_PATH]
    if environ.get("TANDEM_NGINX_CONFIG"):
        candidates.insert(0, Path(environ["TANDEM_NGINX_CONFIG"]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise NginxMissing(
        f"the nginx config {CONFIG_PATH} is not found (looked at "
        f"{', '.join(str(path) for path in candidates)}): run from a checkout of Tandem, or "
        "set TANDEM_NGINX_CONFIG to the file"
    )


def find_binary() -> Path:
    for candidate in (os.environ.get("TANDEM_NGINX"), UNPACKED, shutil.which("nginx")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise NginxMissing("no nginx: run `make nginx` (unpacks Debian's package into .cache/)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def render(upstreams: list[int], listen: int, workdir: Path) -> str:
    """The shipped config, pointed at these loopback ports and this working folder."""
    config = find_config()
    text = config.read_text(encoding="utf-8")
    text, replaced = re.subn(r"(?m)^\s*server 10\.0\.0\.\d+:50051 .*\n", "", text)
    if replaced != 3:
        raise ValueError(f"{config} changed shape: its example upstream lines are gone")
    servers = "".join(
        f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;\n" for port in upstreams
    )
    text = text.replace("    upstream tandem {\n", "    upstream tandem {\n" + servers, 1)
    text = text.replace("listen 50051 http2;", f"listen 127.0.0.1:{listen} http2;")
    # Debian's compiled-in temp paths need root; an unprivileged run needs its own.
    temp = "".join(
        f"    {name}_temp_path {workdir / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp, 1)
    return text.replace("worker_processes auto;", "worker_processes 1;")


class Nginx:
    def __init__(self, upstreams: list[int], workdir: Path) -> None:
        binary = find_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.error_log = workdir / "error.log"
        config = workdir / "nginx.conf"
        config.write_text(render(upstreams, self.port, workdir), encoding="utf-8")
        settings = f"daemon off; pid {workdir}/nginx.pid; error_log {self.error_log} warn;"
        if os.geteuid() == 0:
            # Workers would drop to nobody, who cannot enter a private temporary folder.
            settings += " user root;"
        self.output = workdir / "stderr.log"  # start-up errors land here, not in error_log
        with self.output.open("w") as output:
            self.process = subprocess.Popen(
                [binary, "-p", str(workdir), "-c", str(config), "-g", settings],
                stderr=output,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.output.read_text()}")
            try:
                grpc.channel_ready_future(grpc.insecure_channel(self.address)).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                continue
        raise TimeoutError("nginx did not start listening in 30 s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)  # graceful: finish the calls in flight
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
