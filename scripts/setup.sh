#!/usr/bin/env bash
# parlm set-up, idempotent and quiet when already done:
#   1. .venv with this machine's python3 (3.10 or newer);
#   2. PyTorch: the CPU build on a machine without an NVIDIA GPU (never the multi-GB CUDA
#      build), the regular PyPI build where `nvidia-smi -L` lists a GPU;
#   3. parlm itself, editable, with the dev extras (pytest, pytest-xdist);
#   4. the Jupyter kernel "parlm" pointing at this .venv.
# A stamp (.venv/.parlm-setup) records the hash of pyproject.toml and this script; while it
# matches and the kernel points here, the script exits at once.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
venv="$root/.venv"
python_bin="${PYTHON:-python3}"
torch_version="2.13.0"
stamp="$venv/.parlm-setup"
say() { echo "setup: $*" >&2; }

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

kernel_json() {
  "$venv/bin/python" -c 'import jupyter_core.paths as p; print(p.jupyter_data_dir())' 2>/dev/null \
    | sed 's|$|/kernels/parlm/kernel.json|'
}

kernel_ok() {
  local file
  file="$(kernel_json)" || return 1
  [ -n "$file" ] && [ -f "$file" ] && grep -qF "\"$venv/bin/python\"" "$file"
}

installed=0
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  installed=1
fi
if [ "$installed" = 1 ] && kernel_ok; then
  exit 0
fi

if [ "$installed" = 0 ]; then
  if ! command -v "$python_bin" >/dev/null 2>&1; then
    say "no $python_bin on PATH; install Python 3.10+ (or set PYTHON=/path/to/python3)"
    exit 1
  fi
  if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    say "$("$python_bin" --version 2>&1) is too old; parlm needs Python 3.10 or newer"
    exit 1
  fi

  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "creating $venv with $("$python_bin" --version 2>&1)"
    rm -rf "$venv"
    "$python_bin" -m venv "$venv"
  fi
  pip_install() {
    # Quiet; drops pip's notes about configured package folders that this machine lacks.
    "$venv/bin/python" -m pip --disable-pip-version-check install -q "$@" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }

  if ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      say "NVIDIA GPU found: installing torch==$torch_version (CUDA build)"
      pip_install "torch==$torch_version"
    else
      # The +cpu local version exists only as a CPU wheel (this machine's wheel folder or the
      # PyTorch CPU index), so this can never pull the multi-GB CUDA build from PyPI.
      say "no NVIDIA GPU: installing torch==$torch_version+cpu (CPU build)"
      if ! pip_install "torch==$torch_version+cpu" 2>/dev/null; then
        say "no local CPU wheel; trying the PyTorch CPU index"
        pip_install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
      fi
    fi
  fi

  say "installing parlm (editable) and its dependencies"
  pip_install -e ".[dev]"
  echo "$want" > "$stamp"
fi

if ! kernel_ok; then
  say "registering the Jupyter kernel 'parlm'"
  "$venv/bin/python" -m ipykernel install --user --name parlm --display-name parlm >/dev/null
fi

say "done ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
