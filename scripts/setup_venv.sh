#!/usr/bin/env bash
# Creates .venv with Python 3.10 and installs the exact lock; a second run with the same lock is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python310() {
  local candidate
  for candidate in python3.10 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in "$root"/versions/3.10.*/bin/python; do
    [[ -x $candidate ]] && { echo "$candidate"; return 0; }
  done
  return 1
}

if [[ ${1:-} == --print-python ]]; then find_python310; exit; fi

venv=.venv
stamp=$venv/.installed
want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  touch "$stamp"   # keeps make from asking again after a mere `touch requirements.txt`
  exit 0
fi

if [[ ! -x $venv/bin/python ]]; then
  python=$(find_python310) || {
    echo "conveyor: Python 3.10 is required (tfx 1.16 supports < 3.11); install it, e.g. 'pyenv install 3.10', then run 'make setup' again." >&2
    exit 2
  }
  echo "conveyor: creating $venv with $python"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi

# Some machines' pip configuration names local indexes that do not exist; pip warns once per package.
quiet_pip() {
  "$venv/bin/python" -m pip "$@" --quiet --disable-pip-version-check 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

echo "conveyor: installing the locked stack into $venv (first time: ~3 minutes, ~3.5 GB)"
quiet_pip install --upgrade pip
quiet_pip install -r requirements.txt
# Environments made before the project took its own import root hold the old distribution's name.
if "$venv/bin/python" -m pip show conveyor >/dev/null 2>&1; then quiet_pip uninstall -y conveyor; fi
quiet_pip install --no-deps -e .
echo "$want" > "$stamp"
echo "conveyor: environment ready"
