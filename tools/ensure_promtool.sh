#!/usr/bin/env bash
# Installs promtool (Debian's `prometheus` package) when it is missing: tests/test_prometheus.py
# checks edged's Prometheus text with `promtool check metrics`. Never leaves the service running.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then exit 0; fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "installing promtool (package prometheus) from the OS packages" >&2
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  if [ -d /run/systemd/system ]; then $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
elif command -v dnf >/dev/null 2>&1; then $SUDO dnf install -y -q golang-github-prometheus
else echo "no known package manager: install promtool by hand" >&2; exit 1
fi
