#!/usr/bin/env bash
# Debian's chromium for the dashboard's browser tests (Playwright drives it through
# executable_path; no browser is downloaded). Installed with apt-get when missing.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium is missing and apt-get is not available: install Debian's chromium" >&2
  exit 1
fi
echo "installing chromium (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
command -v chromium
