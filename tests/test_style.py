"""The code is ruff clean and ruff formatted (the configuration is ruff.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    # ruff is a declared test dependency: its absence is a failure, not a skip.
    ruff = str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        ruff = shutil.which("ruff") or "ruff"
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run([ruff, *args, str(ROOT)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_imports_run_one_way_without_circles():
    """tools/check_imports.py: no module imports a layer above its own, no import circle."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_imports.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
