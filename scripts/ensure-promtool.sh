#!/usr/bin/env bash
# Make sure `promtool` is installed (Debian's `prometheus` package ships it), so that
# `make test` checks and unit-tests deploy/prometheus's alert rules. Idempotent; the
# package's server is not started (no init system runs it here).
set -euo pipefail

log() { echo "ensure-promtool: $*" >&2; }

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { log "ERROR: install promtool (Prometheus) manually"; exit 1; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}
log "apt-get install -y --no-install-recommends prometheus"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus >&2
command -v promtool >/dev/null 2>&1 || { log "ERROR: promtool still not found"; exit 1; }
