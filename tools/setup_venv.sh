#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv by default).
# Idempotent: when the stamp matches this script and setup.py, nothing is reinstalled.
# A detectron2 that is already importable in the environment is kept as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VILD_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
STAMP="$VENV/.vild_d2_setup"
WANT="$(cat "$ROOT/tools/setup_venv.sh" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    exit 0
fi

echo "[setup] preparing $VENV (this happens once; later runs skip it)"
if [[ ! -x "$VENV/bin/python" ]]; then
    # VILD_SYSTEM_SITE_PACKAGES=1 lets the venv see a detectron2 built in the base interpreter.
    if [[ "${VILD_SYSTEM_SITE_PACKAGES:-0}" == "1" ]]; then
        "$PY_BOOT" -m venv --system-site-packages "$VENV"
    else
        "$PY_BOOT" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# pip warns once per unreadable local index entry; keep the log readable.
_quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

# torch/torchvision pair first: the only pair known to import together here.
"${PIP[@]}" install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | _quiet
# The project and its declared dependencies (detectron2 is not on the registry by name).
"${PIP[@]}" install -q -e "$ROOT[dev]" 2>&1 | _quiet
# LVIS evaluation. lvis 0.5.3 declares opencv-python (the venv has the headless build) and Cython,
# which it does not need to evaluate, so it comes without its declared dependencies; the np.float
# it still calls is restored by vild_d2/evaluation/lvis_compat.py.
"${PIP[@]}" install -q --no-deps "lvis==0.5.3" 2>&1 | _quiet

if "$PY" -c "import detectron2" >/dev/null 2>&1; then
    echo "[setup] keeping the detectron2 already importable: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
else
    # Upstream detectron2 Python code, published as a cp310 wheel; installs as pure Python.
    SP="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "${PIP[@]}" install -q --upgrade --no-deps --only-binary=:all: \
        --python-version 3.10 --platform any --target "$SP" "sal-detectron2==0.7.2" 2>&1 | _quiet
    # That wheel also drops a top-level 'tools' package, which would shadow ours.
    rm -rf "$SP/tools"
fi

"$PY" -c "import torch, torchvision, detectron2, clip, lvis, vild_d2" \
    || { echo "[setup] error: the environment in $VENV does not import; delete it and rerun" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[setup] done: $VENV"
