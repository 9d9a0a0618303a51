#!/usr/bin/env bash
# Installs Mosquitto from the OS packages when it is missing; never leaves the system service running
# (tests and `make run` start their own broker).
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then exit 0; fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "installing mosquitto from the OS packages" >&2
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get install -y -qq mosquitto >/dev/null 2>&1 || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq mosquitto >/dev/null; }
  if [ -d /run/systemd/system ]; then $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
elif command -v dnf >/dev/null 2>&1; then $SUDO dnf install -y -q mosquitto
elif command -v apk >/dev/null 2>&1; then $SUDO apk add -q mosquitto
else echo "no known package manager: install mosquitto by hand" >&2; exit 1
fi
