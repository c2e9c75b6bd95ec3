"""usearch loaded before onnxruntime crashes the process; the server package prevents that."""

from __future__ import annotations

import subprocess
import sys


def test_server_modules_import_in_any_order() -> None:
    for module in (
        "tandem.server.engine.index",
        "tandem.server.engine.store",
        "tandem.server.engine.collection",
        "tandem.benchmarks.vector_search",
    ):
        result = subprocess.run(
            [sys.executable, "-c", f"import {module}; import onnxruntime; print('ok')"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, (module, result.returncode, result.stderr[-500:])
        assert result.stdout.strip() == "ok"
