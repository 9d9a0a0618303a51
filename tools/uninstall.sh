#!/usr/bin/env bash
# Remove what tools/install.sh installed.
#
#   sudo tools/uninstall.sh [--purge]
#
# Removes the unit (stopping and disabling it first where systemd runs), the
# `edged` link and $PREFIX (the venv). Keeps /etc/edged (your config) and
# /var/lib/edged (your models) unless --purge, which also removes them, the
# unit's drop-ins and the edged user and group. Idempotent.
#
# Variables: ROOT, PREFIX, BINDIR, UNITDIR as for install.sh (same defaults;
# with ROOT other than / no user, group or systemctl is touched).
set -euo pipefail

ROOT=${ROOT:-/}
PREFIX=${PREFIX:-/opt/edged}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SERVICE_USER=edged

PURGE=0
for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) printf 'usage: %s [--purge]\n' "$0" >&2; exit 2 ;;
    esac
done

R=${ROOT%/}
LIVE=0; [[ -z $R ]] && LIVE=1

say() { printf 'uninstall: %s\n' "$*"; }
die() { printf 'uninstall: error: %s\n' "$*" >&2; exit 1; }

# rm -rf of $PREFIX must never hit / or a system directory by a typo.
case $PREFIX in
    /|/usr|/usr/*bin|/usr/local|/opt|/etc|/var|/home|''|*' '*|[!/]*) die "refusing PREFIX='$PREFIX'" ;;
esac
if (( LIVE )) && [[ $(id -u) -ne 0 ]]; then
    die "must be run as root (or set ROOT=DIR to act on a staging tree)"
fi

remove() {  # remove PATH... and say so, if present
    local p
    for p in "$@"; do
        if [[ -e $p || -L $p ]]; then
            rm -rf -- "$p"
            say "removed $p"
        fi
    done
}

UNIT=$R$UNITDIR/edged.service
SYSTEMD=0
(( LIVE )) && [[ -d /run/systemd/system ]] && SYSTEMD=1
if (( SYSTEMD )); then
    if systemctl cat edged.service >/dev/null 2>&1; then
        systemctl disable --now edged.service 2>/dev/null || true
        say "stopped and disabled edged.service"
    fi
elif (( LIVE )); then
    say "note: systemd is not running here (not PID 1); not stopping anything"
fi
remove "$UNIT"
(( PURGE )) && remove "$UNIT.d"
if (( SYSTEMD )); then
    systemctl daemon-reload
    systemctl reset-failed edged.service 2>/dev/null || true
    say "ran systemctl daemon-reload"
fi

# Only our link: never a different `edged` someone put in $BINDIR.
LINK=$R$BINDIR/edged
if [[ -L $LINK && $(readlink "$LINK") == "$PREFIX/venv/bin/edged" ]]; then
    remove "$LINK"
elif [[ -e $LINK ]]; then
    say "left $LINK alone: not a link to $PREFIX/venv/bin/edged"
fi
remove "$R$PREFIX"

if (( PURGE )); then
    remove "$R/etc/edged" "$R/var/lib/edged"
    if (( LIVE )); then
        if getent passwd "$SERVICE_USER" >/dev/null; then
            userdel "$SERVICE_USER"
            say "removed user $SERVICE_USER"
        fi
        if getent group "$SERVICE_USER" >/dev/null; then
            groupdel "$SERVICE_USER"
            say "removed group $SERVICE_USER"
        fi
    fi
else
    for d in "$R/etc/edged" "$R/var/lib/edged"; do
        [[ -e $d ]] && say "kept $d (use --purge to remove it)"
    done
    (( LIVE )) && getent passwd "$SERVICE_USER" >/dev/null && say "kept user $SERVICE_USER (use --purge to remove it)"
fi
say "done"
