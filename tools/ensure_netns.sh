#!/usr/bin/env bash
# Installs iproute2 (`ip netns`, for the fleet tests' separate hosts) when it is missing and we are root;
# as another user the fleet tests skip, saying so.
set -euo pipefail
if command -v ip >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then exit 0; fi
echo "installing iproute2 from the OS packages" >&2
if command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -qq iproute2 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; }
elif command -v dnf >/dev/null 2>&1; then dnf install -y -q iproute
elif command -v apk >/dev/null 2>&1; then apk add -q iproute2
else echo "no known package manager: install iproute2 by hand" >&2; exit 1
fi
