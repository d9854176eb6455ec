"""scripts/gpu_check.sh, the one prepared GPU run: its exit status says whether the checks passed (run here with
fake nvidia-smi and python3 on the PATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
FAKE_PYTHON = """#!/bin/bash
case "$*" in
  *"assert torch.cuda.is_available()"*) exit "${FAKE_NO_GPU:-0}" ;;
  *"-m pytest"*) echo "1 failed, 64 passed"; exit "${FAKE_PYTEST_RC:-0}" ;;
  *profile_engine*) echo "streams=1 step 9 ms" ;;
  *) echo "fake python3 $*" ;;
esac
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("nvidia-smi", "#!/bin/bash\necho 'NVIDIA H200, 580'\n")):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("stages, env, status", [
    (["tests"], {}, 0), (["tests"], {"FAKE_PYTEST_RC": "1"}, 1), ([], {"FAKE_PYTEST_RC": "1"}, 1),
    (["tests"], {"FAKE_NO_GPU": "1"}, 3), (["nonsense"], {}, 1)])
def test_the_gpu_run_exits_non_zero_when_a_check_failed_or_could_not_run(fake_bin, tmp_path, stages, env, status):
    """It exited 0 whatever pytest did (its status was only written to the log), and a machine whose torch saw no
    GPU passed with every GPU test skipped (a review)."""
    environment = {**os.environ, **env, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(SCRIPT), *stages], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == status, done.stdout + done.stderr
