"""The package layout: one import name installed, and a command line that loads lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("onnxruntime", "usearch", "grpc", "torch", "transformers", "numpy")


def test_tandem_help_loads_no_runtime():
    probe = (
        "import sys\n"
        "from tandem import cli\n"
        "for argv in (['--help'], ['serve', '--help'], ['index', 'build', '--help']):\n"
        "    try:\n"
        "        cli.build_parser().parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]


def test_the_server_never_imports_the_export_stack():
    # The start-up precision choice reads the export's parity probe (tandem.export.probe):
    # that must not pull torch, transformers or nncf into a CPU server.
    probe = (
        "import sys, tandem.server.app\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'nncf'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]


def test_installing_claims_one_import_name():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(ROOT), include=include)
    assert {"tandem.server", "tandem.export", "tandem.benchmarks", "tandem.server.engine"} <= set(
        packages
    )
    assert {name.split(".")[0] for name in packages} == {"tandem"}


def test_nothing_imports_the_folders_by_their_bare_names():
    """``import server`` would load a second copy of every module beside tandem.server."""
    bare = {"server", "export", "benchmarks"}
    offenders = []
    for folder in ("tandem", "server", "export", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if "node_modules" in path.parts or path.parts[-2] == "v1":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [f"{path}: {name}" for name in names if name.split(".")[0] in bare]
    assert not offenders
