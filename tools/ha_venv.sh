#!/usr/bin/env bash
# Creates .venv-ha: the real Home Assistant release whose MQTT discovery schema the tests validate
# edged's discovery payloads against (tests/test_homeassistant.py runs tools/ha_validate.py in it).
# 2024.3.3 is the last release that installs on Python 3.11 (Requires-Python >=3.11.0; 2024.4.0
# asks for 3.12). paho-mqtt 1.6.1 is what its mqtt integration's manifest requires.
# Cached: a stamp naming the release; a second run with the stamp in place does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
HA_VERSION="${HA_VERSION:-2024.3.3}"
VENV="${HA_VENV:-.venv-ha}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.ha-$HA_VERSION"
[ -f "$STAMP" ] && exit 0
echo "setting up $VENV with homeassistant==$HA_VERSION (once; cached by $STAMP)" >&2
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -m pip install -q "homeassistant==$HA_VERSION" "paho-mqtt==1.6.1" >"$VENV/pip.log" 2>&1; then
  tail -n 30 "$VENV/pip.log" >&2
  echo "tools/ha_venv.sh: pip could not install homeassistant==$HA_VERSION (log: $VENV/pip.log)" >&2
  exit 1
fi
"$VENV/bin/python" -c "import homeassistant.components.mqtt.sensor"  # the import the validator needs
touch "$STAMP"
