#!/usr/bin/env bash
# Sets up everything voicelm needs on a Debian/Ubuntu machine: system packages, a virtual
# environment in .venv with the pinned Python stack, and the project itself (editable).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

# espeak-ng + sox: synthetic speech; chromium: the demo's browser test (Playwright drives it).
SYSTEM_PACKAGES=(espeak-ng sox chromium chromium-driver)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing Python packages (pinned; the first run takes a few minutes)"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.lock
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
.venv/bin/pip check >/dev/null || { .venv/bin/pip check; exit 1; }
echo "[setup] done: .venv/bin/voicelm --help"
