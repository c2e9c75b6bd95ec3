"""Generates the gRPC code from protos/ whenever the package is built or installed.

The generated modules (``tandem/v1/tandem_pb2*.py`` and their stubs) are never committed or
edited: ``pip install .`` and ``pip install -e .`` both run ``build_py``, which runs protoc
from grpcio-tools (a build requirement in pyproject.toml) before collecting the packages.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "tandem" / "v1"


def generate() -> None:
    import importlib.resources

    from grpc_tools import protoc

    includes = importlib.resources.files("grpc_tools") / "_proto"
    sources = sorted(str(path.relative_to(PROTOS)) for path in PROTOS.rglob("*.proto"))
    GENERATED.mkdir(parents=True, exist_ok=True)
    (GENERATED / "__init__.py").write_text('"""Generated from protos/tandem/v1 at build time."""\n')
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{includes}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            *sources,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed ({code}) on {', '.join(sources)}")


class BuildWithProtos(build_py):
    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
