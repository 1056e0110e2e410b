#!/usr/bin/env bash
# Installs Debian's Chromium for tests/test_serve_browser.py (driven by Playwright
# through executable_path, so no `playwright install` download). Idempotent and quiet:
# does nothing when a Chromium is already there; prints one line when it installs.
# Set SAMJAX_CHROMIUM to use another binary (the tests read it too).
set -euo pipefail

for exe in "${SAMJAX_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -n "$exe" ] && [ -x "$exe" ]; then
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: no apt-get here; the browser tests will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_browser.sh: not root and no sudo; the browser tests will skip" >&2
    exit 0
  fi
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq >"$log" 2>&1 &&
   $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core \
     >>"$log" 2>&1; then
  echo "install_browser.sh: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
else
  echo "install_browser.sh: apt-get failed; the browser tests will skip. Last lines:" >&2
  tail -n 5 "$log" >&2
fi
