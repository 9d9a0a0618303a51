#!/usr/bin/env bash
# Install edged as a systemd service.
#
#   sudo tools/install.sh [SOURCE]      SOURCE: the edged source tree to
#                                       pip-install (default: this repo)
#
# Idempotent: re-running upgrades the package in place, re-installs the unit
# and keeps an existing /etc/edged/edged.yaml untouched.
#
# Variables (environment):
#   ROOT=/           file system root every path is put under. With ROOT other
#                    than / nothing on the running system is touched: no user
#                    or group is created, no chown, no systemctl, and root is
#                    not required (a staging tree for tests or packaging; the
#                    venv there only works from that location).
#   PREFIX=/opt/edged   the venv goes to $PREFIX/venv
#   BINDIR=/usr/local/bin   where the `edged` link goes (ExecStart follows it)
#   UNITDIR=/etc/systemd/system
#   PYTHON=/usr/bin/python3   interpreter for the venv (3.11 or newer, not
#                    under /home or /root; else python3 from PATH)
#   PIP_INSTALL_ARGS extra arguments for `pip install` (e.g. --no-index
#                    --find-links DIR for an offline device)
set -euo pipefail

ROOT=${ROOT:-/}
PREFIX=${PREFIX:-/opt/edged}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
# The distribution's interpreter by default: one under /root or /home (pyenv)
# is hidden from the service by ProtectHome=yes.
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3 || echo python3)}
PIP_INSTALL_ARGS=${PIP_INSTALL_ARGS:-}
SERVICE_USER=edged
DEVICE_GROUPS=(plugdev render video apex)  # Coral USB, GPU render node, Coral PCIe

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "${1:-$SCRIPT_DIR/..}" && pwd)
R=${ROOT%/}                    # "" for the live system, else the staging root
LIVE=0; [[ -z $R ]] && LIVE=1
VENV=$PREFIX/venv              # as seen by the installed system
CONF=/etc/edged/edged.yaml

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

[[ $PREFIX == /?* && $PREFIX != *' '* ]] || die "PREFIX must be an absolute path without spaces: '$PREFIX'"
if (( LIVE )) && [[ $(id -u) -ne 0 ]]; then
    die "must be run as root (or set ROOT=DIR to stage into DIR)"
fi
[[ -f $SRC/pyproject.toml || -f $SRC/setup.py ]] || die "$SRC is not a Python project (no pyproject.toml)"
[[ -f $SRC/systemd/edged.service ]] || die "$SRC/systemd/edged.service missing"
[[ -f $SRC/configs/edged.yaml ]] || die "$SRC/configs/edged.yaml missing"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.11 (set PYTHON=...)"

# --- user and groups --------------------------------------------------------
if (( LIVE )); then
    if getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER exists"
    else
        nologin=$(command -v nologin || echo /usr/sbin/nologin)
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell "$nologin" --comment "edged inference daemon" "$SERVICE_USER"
        say "created system user and group $SERVICE_USER (no login, no home)"
    fi
    # Device access comes from these groups where the host has them; the unit
    # does not name them (SupplementaryGroups= with a missing group fails the start).
    for g in "${DEVICE_GROUPS[@]}"; do
        getent group "$g" >/dev/null || continue
        if id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx "$g"; then
            say "user $SERVICE_USER already in group $g"
        else
            usermod -a -G "$g" "$SERVICE_USER"
            say "added user $SERVICE_USER to group $g"
        fi
    done
else
    say "ROOT=$ROOT: skipping user/group creation"
fi

# --- venv and package -------------------------------------------------------
# A running daemon is stopped for the upgrade (it drains; QoS 1 frames wait in
# its broker session): its workers are spawned from the venv, and a worker
# started from a half-replaced package, or newer than its supervisor, must not run.
WAS_ACTIVE=0
if (( LIVE )) && [[ -d /run/systemd/system ]] && systemctl is-active --quiet edged.service; then
    systemctl stop edged.service
    WAS_ACTIVE=1
    say "stopped the running edged.service for the upgrade"
fi
# The venv links to its base interpreter: the service must be able to reach
# it, and ProtectHome=yes hides /home and /root (e.g. a pyenv build) from it.
base=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
case $base in
    /home/*|/root/*|/run/user/*)
        die "$PYTHON is $base, under a home directory that the unit hides (ProtectHome=yes); set PYTHON=/usr/bin/python3 or another interpreter outside /home and /root" ;;
esac
have=$("$R$VENV/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' 2>/dev/null || true)
if [[ $have == "$base" ]]; then
    say "reusing venv $R$VENV"
else
    rm -rf "$R$VENV"
    mkdir -p "$R$PREFIX"
    "$PYTHON" -m venv "$R$VENV" \
        || die "could not create a venv (Debian/Ubuntu: apt-get install python3-venv)"
    say "created venv $R$VENV ($base)"
fi
if (( LIVE )) && ! runuser -u "$SERVICE_USER" -- "$VENV/bin/python" -c '' 2>/dev/null; then
    die "user $SERVICE_USER cannot run $VENV/bin/python (base interpreter $base)"
fi
# A path requirement is always rebuilt and reinstalled, so a re-run with an
# unchanged version number still installs the current source.
# shellcheck disable=SC2086  # PIP_INSTALL_ARGS is a list of words on purpose
"$R$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_INSTALL_ARGS --upgrade "$SRC"
say "installed $("$R$VENV/bin/python" -m pip show edged 2>/dev/null | sed -n 's/^Version: /edged /p') from $SRC into $R$VENV"
[[ -x $R$VENV/bin/edged ]] || die "the package did not install an 'edged' console script"

mkdir -p "$R$BINDIR"
ln -sfn "$VENV/bin/edged" "$R$BINDIR/edged"
say "linked $R$BINDIR/edged -> $VENV/bin/edged"

# --- directories --------------------------------------------------------------
mkdir -p "$R/etc/edged" "$R/var/lib/edged/models"
chmod 0750 "$R/etc/edged" "$R/var/lib/edged"
if (( LIVE )); then
    chown root:"$SERVICE_USER" /etc/edged
    # systemd would do this at start too (StateDirectory=); do it now so that
    # models copied in before the first start are readable.
    chown -R "$SERVICE_USER:$SERVICE_USER" /var/lib/edged
fi
say "directories $R/etc/edged and $R/var/lib/edged/models are in place"

# --- config -------------------------------------------------------------------
if [[ -e $R$CONF ]]; then
    say "kept existing $R$CONF (never overwritten; the shipped default is $SRC/configs/edged.yaml)"
else
    # The repo's config names the model relative to itself; the installed one
    # points at the model bundled in the venv and at the systemd socket path.
    # Only those lines are rewritten so the file keeps its comments; pyyaml
    # then checks the result.
    # -I: isolated, so the current directory (a checkout holding edged/) does not shadow the venv's package
    "$R$VENV/bin/python" -I - "$SRC/configs/edged.yaml" "$R$CONF.tmp" "$R" <<'PY'
import importlib.util, re, sys
from pathlib import Path
import yaml

src, dst, root = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
spec = importlib.util.find_spec("edged")  # locate without importing the package
if spec is None or not spec.submodule_search_locations:
    sys.exit("install: error: package edged not found in the venv")
models = Path(list(spec.submodule_search_locations)[0]) / "models"
data = yaml.safe_load(src.read_text()) or {}

def bundled(value, default):
    # Keep the configured file if the package ships one of that name.
    name = Path(str(value)).name if value else default
    path = models / name if (models / name).is_file() else models / default
    if not path.is_file():
        sys.exit(f"install: error: bundled model file {path} missing")
    return str(path)[len(root):] if root and str(path).startswith(root) else str(path)

model = data.get("model") or {}
want = {("model", "path"): bundled(model.get("path"), "digits.tflite")}
if model.get("labels") is not None:  # null stays null (task: raw)
    want[("model", "labels")] = bundled(model["labels"], "digits_labels.txt")
want[("status", "socket")] = "/run/edged/edged.sock"

expected = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
for (s, k), v in want.items():
    if not isinstance(expected.get(s), dict):
        expected[s] = {}
    expected[s][k] = v

lines = src.read_text().splitlines()
for (section, key), value in want.items():
    quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    start = next((i for i, l in enumerate(lines) if re.match(rf"{section}:", l)), None)
    if start is None:
        lines += [f"{section}:", f"  {key}: {quoted}"]
        continue
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    body = [i for i in range(start + 1, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
    indent = min((len(lines[i]) - len(lines[i].lstrip()) for i in body), default=2)
    pat = re.compile(rf"^( {{{indent}}}){re.escape(key)}:(\s*)([^#]*?)(\s+#.*)?$")
    hit = next((i for i in body if pat.match(lines[i])), None)
    if hit is None:
        lines.insert(start + 1, " " * indent + f"{key}: {quoted}")
    else:
        m = pat.match(lines[hit])
        lines[hit] = f"{m.group(1)}{key}: {quoted}{m.group(4) or ''}"
text = "\n".join(lines) + "\n"
try:
    same = yaml.safe_load(text) == expected
except yaml.YAMLError:
    same = False
if not same:
    # Odd layout (flow style, anchors): fall back to a plain dump, comments lost.
    text = "# Written by tools/install.sh; the commented default is configs/edged.yaml.\n"
    text += yaml.safe_dump(expected, sort_keys=False)
    print("install: note: config layout not editable in place; wrote it without comments")
dst.write_text(text)
for (s, k), v in want.items():
    print(f"install: config {s}.{k} = {v}")
PY
    chmod 0640 "$R$CONF.tmp"
    # 0640 root:edged: it may hold MQTT credentials.
    if (( LIVE )); then chown root:"$SERVICE_USER" "$R$CONF.tmp"; fi
    mv "$R$CONF.tmp" "$R$CONF"
    say "installed $R$CONF (mode 0640$( (( LIVE )) && echo ", owner root:$SERVICE_USER"))"
fi

# --- unit ---------------------------------------------------------------------
mkdir -p "$R$UNITDIR"
sed "s|^ExecStart=/usr/local/bin/edged |ExecStart=$BINDIR/edged |" \
    "$SRC/systemd/edged.service" > "$R$UNITDIR/edged.service.tmp"
chmod 0644 "$R$UNITDIR/edged.service.tmp"
mv "$R$UNITDIR/edged.service.tmp" "$R$UNITDIR/edged.service"
say "installed $R$UNITDIR/edged.service"

if (( LIVE )) && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    say "ran systemctl daemon-reload"
    if (( WAS_ACTIVE )); then
        systemctl start edged.service
        say "started edged.service again on the new version"
    else
        say "start it with: systemctl enable --now edged.service"
    fi
elif (( LIVE )); then
    say "note: systemd is not running here (not PID 1); run 'systemctl daemon-reload' and 'systemctl enable --now edged.service' on a systemd host"
else
    say "ROOT=$ROOT: skipping systemctl"
fi

if (( LIVE )); then
    # As the service user, so unreadable files show up now, not at first start.
    if timeout 300 runuser -u "$SERVICE_USER" -- "$BINDIR/edged" check -c "$CONF" >/dev/null 2>&1; then
        say "edged check -c $CONF: ok"
    else
        say "warning: 'edged check -c $CONF' failed; run it to see why"
    fi
fi
say "done"
