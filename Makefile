# edged: `make run` serves the bundled model on a local broker; `make test` runs every test.
# Both set everything up from a fresh clone: .venv, the package, Mosquitto from the OS packages.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/edged.yaml
HOURS  ?= 1
SCALE  ?= 1


.PHONY: lint run test check bench soak soak-72h model mosquitto install uninstall tflite-venv clean device-check device-image

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

mosquitto:
	@tools/ensure_mosquitto.sh

run: $(STAMP) mosquitto
	tools/run_local.sh $(CONFIG)

# the whole suite, then the model-level tests again on the tflite-runtime backend (its own venv: numpy<2)
# the consumers' own checkers: promtool (Debian's prometheus) and a real Home Assistant in .venv-ha (cached)
# lint first: ruff (rules in pyproject.toml) over the package, the tests and the tools; mypy over the package
lint: $(STAMP)
	$(BIN)/ruff check edged tests tools
	$(BIN)/mypy

test: $(STAMP) mosquitto lint
	tools/ensure_promtool.sh
	tools/ha_venv.sh
	@tools/ensure_netns.sh
	$(BIN)/python -m pytest -q
	tools/tflite_venv.sh

tflite-venv:
	tools/tflite_venv.sh

check: $(STAMP)
	$(BIN)/edged check -c $(CONFIG)

bench: $(STAMP) mosquitto
	$(BIN)/edged bench -c $(CONFIG)

soak: $(STAMP) mosquitto
	$(BIN)/python tools/soak.py --hours $(HOURS)

# 72 hours of a busy site (1.05 M frames, 72 broker restarts, 72 worker kills, 216 reloads, 72 accelerator
# fail-overs and fail-backs, 24 model updates) in about an hour; SCALE=0.05 for a few minutes (tools/SOAK.md)
soak-72h: $(STAMP) mosquitto
	$(BIN)/python tools/soak.py --profile site72h --scale $(SCALE)

# Rebuilds the bundled model (needs TensorFlow, in a venv of its own).
model:
	test -x .venv-model/bin/python || $(PYTHON) -m venv .venv-model
	.venv-model/bin/python -m pip install -q tensorflow-cpu scikit-learn pillow
	.venv-model/bin/python tools/build_model.py

install:
	tools/install.sh

# An emulated 512 MB arm64 board (Debian 12, systemd, qemu TCG): make install there, then
# systemctl/MQTT/journalctl checks; one PASS/FAIL line. Root, 11-15 min with the image cached
# in $${EDGED_DEVICE_CACHE:-/var/cache/edged-device}, +6-8 min to build it. Not part of `make test`.
DEVICE_SOAK_S ?= 180
device-check: $(STAMP)
	$(BIN)/python tools/device/check.py --soak-s $(DEVICE_SOAK_S)

device-image: $(STAMP)
	tools/device/build_image.sh --force

uninstall:
	tools/uninstall.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .run
