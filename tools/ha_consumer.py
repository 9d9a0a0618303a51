"""Runs Home Assistant's MQTT integration for real against a broker and reports the edged entities it made.

Runs in .venv-ha (tools/ha_venv.sh). A Home Assistant core with only what the
MQTT integration needs (no frontend, no recorder): its registries, `http` on
a loopback port, and an MQTT config entry for 127.0.0.1:PORT with discovery on.
Home Assistant connects with its own MQTT client, sends its birth message,
takes the discovery messages and sets the entities up with its own code.

usage: ha_consumer.py BROKER_PORT HTTP_PORT UNIQUE_ID_PREFIX TIMEOUT_S [ENTITY_ID=STATE ...]
                      [--then READY_FILE ENTITY_ID=STATE ...]
Waits until every ENTITY_ID has STATE ("absent": no such entity) or the timeout, then
prints JSON: {"version", "states": {entity_id: {"state", "attributes"}}, "registry":
{entity_id: {"unique_id", "platform", "device_id", "entity_category"}}, "devices":
[{"identifiers", "name", "model", "manufacturer", "sw_version"}], "waited_for": {...},
"then": {...} (the same, after the second phase), "errors": [warnings and errors HA logged]}.
With --then it reports the first phase, creates READY_FILE, and waits for the second set
(the caller changes the daemon meanwhile: stops it, reloads it).
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from homeassistant import auth, bootstrap, config_entries, loader
from homeassistant.const import __version__ as HA_VERSION
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from homeassistant.setup import async_setup_component


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:2000])


async def run(broker_port: int, http_port: int, prefix: str, timeout: float, expect: dict[str, str],
              ready: str | None, then: dict[str, str]) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    errors = Errors()
    logging.getLogger().addHandler(errors)
    with tempfile.TemporaryDirectory() as conf:
        Path(conf, "configuration.yaml").write_text("{}\n")
        hass = HomeAssistant(conf)
        loader.async_setup(hass)
        hass.config_entries = config_entries.ConfigEntries(hass, {})
        await bootstrap.async_load_base_functionality(hass)
        hass.auth = await auth.auth_manager_from_config(hass, [{"type": "homeassistant"}], [])
        assert await async_setup_component(hass, "homeassistant", {})
        assert await async_setup_component(hass, "http", {"http": {"server_host": ["127.0.0.1"],
                                                                  "server_port": http_port}})
        entry = config_entries.ConfigEntry(
            version=1, minor_version=1, domain="mqtt", title="edged test broker", source="user", options={},
            data={"broker": "127.0.0.1", "port": broker_port, "discovery": True,
                  "discovery_prefix": "homeassistant"}, unique_id=None)
        await hass.config_entries.async_add(entry)
        await hass.async_start()

        first = await report(hass, prefix, expect, timeout)
        if ready is not None:
            Path(ready).touch()
            first["then"] = await report(hass, prefix, then, timeout)
        await hass.async_stop()
        first["errors"] = errors.records
        return first


def state_of(hass: HomeAssistant, entity_id: str) -> str:
    st = hass.states.get(entity_id)
    return "absent" if st is None else st.state


async def report(hass: HomeAssistant, prefix: str, expect: dict[str, str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(state_of(hass, k) != v for k, v in expect.items()):
        await asyncio.sleep(0.1)
    ents = {e.entity_id: e for e in er.async_get(hass).entities.values() if (e.unique_id or "").startswith(prefix)}
    devices = dr.async_get(hass)
    out: dict[str, Any] = {"version": HA_VERSION, "waited_for": {k: state_of(hass, k) for k in expect},
                           "states": {}, "registry": {}, "devices": []}
    seen_devices = set()
    for entity_id, e in sorted(ents.items()):
        st = hass.states.get(entity_id)
        out["states"][entity_id] = {"state": st.state if st else None, "attributes": dict(st.attributes) if st else None}
        out["registry"][entity_id] = {"unique_id": e.unique_id, "platform": e.platform, "device_id": e.device_id,
                                      "entity_category": e.entity_category}
        if e.device_id and e.device_id not in seen_devices:
            seen_devices.add(e.device_id)
            d = devices.async_get(e.device_id)
            if d is not None:
                out["devices"].append({"identifiers": sorted(list(i) for i in d.identifiers), "name": d.name,
                                       "model": d.model, "manufacturer": d.manufacturer, "sw_version": d.sw_version})
    return out


if __name__ == "__main__":
    bport, hport, uprefix, tmo = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    args = sys.argv[5:]
    cut = args.index("--then") if "--then" in args else len(args)
    want = dict(a.split("=", 1) for a in args[:cut])
    ready_file = args[cut + 1] if cut < len(args) else None
    then_want = dict(a.split("=", 1) for a in args[cut + 2:])
    json.dump(asyncio.run(run(bport, hport, uprefix, tmo, want, ready_file, then_want)), sys.stdout, indent=1,
              default=str)
    sys.stdout.write("\n")
