#!/usr/bin/env bash
# parlm set-up, idempotent and quiet when already done:
#   1. .venv with this machine's python3 (3.10 or newer);
#   2. PyTorch: the CPU build on a machine without an NVIDIA GPU (never the multi-GB CUDA
#      build), the regular PyPI build where `nvidia-smi -L` lists a GPU;
#   3. parlm itself, editable, with the extras the README's two commands and `make lab` use:
#      `dev` = `lab` (jupyterlab, ipywidgets) + `test` (pytest, pytest-xdist, nbval);
#   4. this checkout's own Jupyter kernel `parlm-<hash of the checkout path>` (display name
#      `parlm (<path>)`, parlm.config.checkout_kernel_name), so a second checkout never re-points
#      another's kernel; the plain `parlm` kernel (the notebooks' metadata) is registered only
#      when absent, and when it belongs to another checkout it is left alone, with a note.
# A stamp (.venv/.parlm-setup) records the hash of pyproject.toml and this script; while it
# matches and this checkout's kernel points here, the script exits at once.
#
# `bash scripts/setup.sh --kernel` only registers this checkout's kernel for the Python given by
# $PYTHON (default: `python` on PATH), e.g. inside the conda environment of environment.yml.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
venv="$root/.venv"
python_bin="${PYTHON:-python3}"
torch_version="2.13.0"
stamp="$venv/.parlm-setup"
say() { echo "setup: $*" >&2; }

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

# kernel_name PYTHON: this checkout's kernel name, from parlm.config (the one definition).
kernel_name() {
  "$1" -c 'import sys; sys.path.insert(0, sys.argv[1]); from parlm.config import checkout_kernel_name as k; print(k())' "$root" 2>/dev/null
}

# kernel_file PYTHON NAME: where the user-wide kernel NAME lives.
kernel_file() {
  "$1" -c 'import jupyter_core.paths as p, sys; print(p.jupyter_data_dir() + "/kernels/" + sys.argv[1] + "/kernel.json")' "$2" 2>/dev/null
}

# kernel_points_here PYTHON NAME: kernel NAME exists and runs PYTHON.
kernel_points_here() {
  local file
  file="$(kernel_file "$1" "$2")" || return 1
  [ -n "$file" ] && [ -f "$file" ] && grep -qF "\"$1\"" "$file"
}

# register_kernels PYTHON: this checkout's kernel, and `parlm` only where it is free or ours.
register_kernels() {
  local python="$1" name file
  name="$(kernel_name "$python")"
  if ! kernel_points_here "$python" "$name"; then
    say "registering the Jupyter kernel '$name' (display name 'parlm ($root)')"
    "$python" -m ipykernel install --user --name "$name" --display-name "parlm ($root)" >/dev/null
  fi
  file="$(kernel_file "$python" parlm)"
  if [ ! -f "$file" ]; then
    "$python" -m ipykernel install --user --name parlm --display-name "parlm ($root)" >/dev/null
  elif ! grep -qF "\"$python\"" "$file"; then
    say "the Jupyter kernel 'parlm' belongs to another environment ($(grep -m1 -o '"/[^"]*python[^"]*"' "$file" || echo '?')); left as it is: pick '$name' in JupyterLab"
  fi
}

if [ "${1:-}" = "--kernel" ]; then
  register_kernels "$(command -v "${PYTHON:-python}")"
  exit 0
fi

kernel_ok() {
  local name
  name="$(kernel_name "$venv/bin/python")" || return 1
  [ -n "$name" ] && kernel_points_here "$venv/bin/python" "$name"
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
  register_kernels "$venv/bin/python"
fi

say "done ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
