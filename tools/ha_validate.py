"""Checks MQTT discovery messages with Home Assistant's own code; runs in .venv-ha (tools/ha_venv.sh).

Input (a JSON file named on the command line): {"discovery_prefix": "homeassistant",
"messages": {topic: payload text, or "" for an empty retained message}}, the
retained messages a subscriber to '#' saw. For every discovery topic this
does what homeassistant.components.mqtt.discovery does with a message (topic
pattern, supported component, JSON object, abbreviations, origin schema) and
then the component's DISCOVERY_SCHEMA, as the entity setup does. A key the
schema silently removes (extra=REMOVE_EXTRA) counts as an error: Home
Assistant would ignore it. Then it renders the entity's templates with Home
Assistant's MqttValueTemplate against the messages on its state, attribute
and availability topics, as the entity would on receiving them, and against an
empty payload (what a subscribed entity gets when its retained state is
cleared): anything Home Assistant logs then is an error.

Output (stdout, JSON): {"version": HA's version, "entities": {topic: {"ok", "errors",
"component", "config", "state", "attributes", "available"}}, "removed": [topics with
an empty payload]}.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import tempfile
from typing import Any

import voluptuous as vol
from homeassistant.components.mqtt import discovery
from homeassistant.components.mqtt.abbreviations import ABBREVIATIONS, DEVICE_ABBREVIATIONS, ORIGIN_ABBREVIATIONS
from homeassistant.components.mqtt.models import MqttValueTemplate
from homeassistant.const import __version__ as HA_VERSION
from homeassistant.core import HomeAssistant
from homeassistant.util.json import json_loads, json_loads_object

NUMERIC_HINTS = ("state_class", "unit_of_measurement", "device_class", "suggested_display_precision")


def expand(payload: dict[str, Any]) -> dict[str, Any]:
    """discovery.async_discovery_message_received's abbreviation expansion, in its order."""
    for key in list(payload):
        payload[ABBREVIATIONS.get(key, key)] = payload.pop(key)
    if isinstance(payload.get("device"), dict):
        dev = payload["device"]
        for key in list(dev):
            dev[DEVICE_ABBREVIATIONS.get(key, key)] = dev.pop(key)
    if isinstance(payload.get("origin"), dict):
        org = payload["origin"]
        for key in list(org):
            org[ORIGIN_ABBREVIATIONS.get(key, key)] = org.pop(key)
        discovery.MQTT_ORIGIN_INFO_SCHEMA(org)
    for av in payload.get("availability") or []:
        if isinstance(av, dict):
            for key in list(av):
                av[ABBREVIATIONS.get(key, key)] = av.pop(key)
    return payload


class Logged(logging.Handler):
    """What Home Assistant logs (template errors, among others) while a template renders."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage()[:500])


LOGGED = Logged()
logging.getLogger("homeassistant").addHandler(LOGGED)


def render(hass: HomeAssistant, tpl: Any, payload: str | None) -> Any:
    if payload is None:
        return None
    return MqttValueTemplate(tpl, hass=hass).async_render_with_possible_json_value(payload)


def quiet_on_empty(hass: HomeAssistant, tpl: Any, what: str, errors: list[str]) -> None:
    """An empty retained message (a state cleared as its entity is removed) must not make HA log an error."""
    if tpl is None:
        return
    LOGGED.records.clear()
    try:
        render(hass, tpl, "")
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        errors.append(f"{what} raises on an empty payload: {exc}")
    errors.extend(f"{what} on an empty payload: {r}" for r in LOGGED.records)


def check(hass: HomeAssistant, prefix: str, topic: str, text: str, messages: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "errors": []}
    errors: list[str] = out["errors"]
    match = discovery.TOPIC_MATCHER.match(topic.replace(f"{prefix}/", "", 1))
    if not topic.startswith(prefix + "/") or not match:
        errors.append("not a discovery topic Home Assistant accepts")
        return out
    component = match.group("component")
    out["component"] = component
    if component not in discovery.SUPPORTED_COMPONENTS:
        errors.append(f"component {component} is not supported")
        return out
    try:
        payload = expand(dict(json_loads_object(text)))
    except (ValueError, vol.Invalid) as exc:
        errors.append(f"payload: {exc}")
        return out
    payload["platform"] = "mqtt"  # as discovery adds it
    schema = importlib.import_module(f"homeassistant.components.mqtt.{component}").DISCOVERY_SCHEMA
    try:
        config = schema(payload)
    except vol.Invalid as exc:
        errors.append(f"{component} DISCOVERY_SCHEMA: {exc}")
        return out
    dropped = sorted(set(payload) - set(config) - {"platform"})
    if dropped:
        errors.append(f"keys Home Assistant ignores: {', '.join(dropped)}")
    out["config"] = {k: (v.template if hasattr(v, "template") else v) for k, v in config.items()
                     if k not in ("device", "origin", "availability")}
    out["device"] = config.get("device")
    quiet_on_empty(hass, config.get("value_template"), "value_template", errors)
    quiet_on_empty(hass, config.get("json_attributes_template"), "json_attributes_template", errors)
    if "state_topic" in config:
        state = render(hass, config.get("value_template"), messages.get(config["state_topic"]))
        out["state"] = state
        if state is not None and any(k in config and config[k] is not None for k in NUMERIC_HINTS):
            try:
                float(state)
            except (TypeError, ValueError):
                errors.append(f"state {state!r} is not numeric but the sensor declares a unit or state class")
    if "json_attributes_topic" in config:
        attrs = render(hass, config.get("json_attributes_template"), messages.get(config["json_attributes_topic"]))
        if attrs is not None:
            parsed = json_loads(attrs) if isinstance(attrs, str) else None
            if not isinstance(parsed, dict):
                errors.append(f"attributes {attrs!r} are not a JSON object")
            out["attributes"] = parsed
    avail = []
    for av in config.get("availability") or []:
        quiet_on_empty(hass, av.get("value_template"), "availability value_template", errors)
        got = render(hass, av.get("value_template"), messages.get(av["topic"]))
        avail.append(None if got is None else got == av["payload_available"])
    out["available"] = all(avail) if avail and None not in avail else (None if avail else True)
    out["ok"] = not errors
    return out


async def main(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    prefix, messages = data["discovery_prefix"], data["messages"]
    with tempfile.TemporaryDirectory() as conf:
        hass = HomeAssistant(conf)
        result: dict[str, Any] = {"version": HA_VERSION, "entities": {}, "removed": []}
        for topic, text in sorted(messages.items()):
            if not topic.startswith(prefix + "/") or not topic.endswith("/config"):
                continue
            if text == "":
                result["removed"].append(topic)
                continue
            result["entities"][topic] = check(hass, prefix, topic, text, messages)
        return result


if __name__ == "__main__":
    json.dump(asyncio.run(main(sys.argv[1])), sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
