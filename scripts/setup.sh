#!/usr/bin/env bash
# Create .venv and install sambridge with its dependencies. Idempotent: a second run with an
# unchanged pyproject.toml installs nothing.
#
# sam2 1.1.0 ships as an sdist whose build imports torch, so torch goes in first and sam2 is
# built without build isolation and without its optional CUDA extension (SAM2_BUILD_CUDA=0;
# the extension only speeds up video post-processing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "Installing into $VENV (first run takes a few minutes: torch is large)..."
"${pip[@]}" "setuptools>=77" wheel
torch_pins=$(grep -oE '"torch(vision)?==[^"]+"' pyproject.toml | tr -d '"')
"${pip[@]}" $torch_pins
sam2_pin=$(grep -oE '"sam2==[^"]+"' pyproject.toml | tr -d '"')
SAM2_BUILD_CUDA=0 "${pip[@]}" --no-build-isolation "$sam2_pin"
"${pip[@]}" -e ".[dev]"
echo "$want" > "$STAMP"
echo "Installed: $("$VENV/bin/python" -c 'import torch, sam2, sam3, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)' 2>/dev/null)"
