#!/usr/bin/env bash
# Install, upgrade or remove the EMDC edge service on a Raspberry Pi.
#
#   sudo deploy/edge/install-edge.sh install            # also the upgrade path
#   sudo deploy/edge/install-edge.sh uninstall          # keeps config, state and user
#   sudo PURGE=1 deploy/edge/install-edge.sh uninstall  # removes them too
#
# Idempotent: running `install` again reinstalls the code from this checkout
# and restarts the service, but never overwrites /etc/emdc/*.
# EMDC_ROOT (tests only) prefixes every path, so a test can install into a
# scratch tree with stand-ins for useradd, systemctl and friends.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROOT=${EMDC_ROOT:-}
PYTHON=${PYTHON:-python3}
PURGE=${PURGE:-}

SERVICE_USER=emdc
UNIT=emdc-edge.service
PREFIX=$ROOT/opt/emdc
VENV=$PREFIX/venv
ETC=$ROOT/etc/emdc
STATE=$ROOT/var/lib/emdc
UNIT_FILE=$ROOT/etc/systemd/system/$UNIT
# `systemctl edit` (and `--runtime`) put local changes here; PURGE=1 removes them.
DROP_INS=("$ROOT/etc/systemd/system/$UNIT.d" "$ROOT/run/systemd/system/$UNIT.d")
UDEV_RULES=$ROOT/etc/udev/rules.d
UDEV_RULE=$UDEV_RULES/60-emdc-gpio.rules
# Present when this script created the group gpio, so that PURGE=1 removes only what it added.
GROUP_MARK=$ETC/created-gpio-group
# What the package is built from; keep in step with pyproject.toml and the Dockerfile.
PACKAGE_PATHS=(pyproject.toml README.md LICENSE common edge backend emdc)

BUILD_DIR=
trap 'rm -rf "$BUILD_DIR"' EXIT

say() { printf 'install-edge: %s\n' "$*"; }
die() { say "error: $*" >&2; exit 1; }

check_prerequisites() {
    [ "$(id -u)" -eq 0 ] || die "run as root: sudo make install-edge"
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: sudo apt install python3"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "EMDC needs Python >= 3.11 (Raspberry Pi OS Bookworm or newer)"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || die "no venv module: sudo apt install python3-venv"
}

ensure_gpio_group() {
    getent group gpio >/dev/null && return
    # Raspberry Pi OS has the group and its udev rule; other systems get the group,
    # and the rule where udev is installed.
    say "creating group gpio"
    install -d -m 0750 "$ETC"
    printf '%s\n' "install-edge.sh created the group gpio; PURGE=1 install-edge.sh uninstall removes it" >"$GROUP_MARK"
    groupadd --system gpio
    if [ ! -d "$(dirname "$UDEV_RULES")" ]; then
        say "no udev here: /dev/gpiochip* stays root's until udev is installed and this script is run again"
        return
    fi
    say "adding a udev rule giving gpio /dev/gpiochip*"
    mkdir -p "$UDEV_RULES"
    printf '%s\n' 'SUBSYSTEM=="gpio", KERNEL=="gpiochip*", GROUP="gpio", MODE="0660"' >"$UDEV_RULE"
    # Without a running udev (a container, early boot) the rule applies from the next boot.
    if command -v udevadm >/dev/null && udevadm control --reload 2>/dev/null; then
        udevadm trigger --subsystem-match=gpio || say "udevadm trigger failed: the rule applies from the next boot"
    else
        say "udev is not running: the rule applies from the next boot"
    fi
}

ensure_user() {
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        say "creating system user $SERVICE_USER"
        useradd --system --user-group --home-dir /var/lib/emdc --no-create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
    usermod --append --groups gpio "$SERVICE_USER"
}

install_code() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        # System site packages let an apt-installed python3-lgpio satisfy the
        # lgpio requirement where pip has no wheel for this Pi.
        "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
    # Build from a copy: building in the checkout would leave root-owned
    # build/ and *.egg-info behind in the owner's working tree.
    BUILD_DIR=$(mktemp -d)
    for path in "${PACKAGE_PATHS[@]}"; do
        if [ -e "$SRC/$path" ]; then cp -R "$SRC/$path" "$BUILD_DIR/"; fi
    done
    say "installing emdc[edge] into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "${BUILD_DIR}[edge]"
}

install_config() {
    install -d -m 0750 "$ETC"
    chown "root:$SERVICE_USER" "$ETC"
    if [ ! -e "$ETC/emdc.toml" ]; then
        say "writing $ETC/emdc.toml from the example"
        install -m 0640 "$SRC/deploy/edge/emdc.example.toml" "$ETC/emdc.toml"
        chown "root:$SERVICE_USER" "$ETC/emdc.toml"
    fi
    if [ ! -e "$ETC/amqp_url" ]; then
        # The secret: readable by the service's group only, never on a command line.
        install -m 0640 /dev/null "$ETC/amqp_url"
        chown "root:$SERVICE_USER" "$ETC/amqp_url"
    fi
}

install_unit() {
    install -D -m 0644 "$SRC/deploy/edge/$UNIT" "$UNIT_FILE"
    systemctl daemon-reload
    systemctl enable "$UNIT"
    if [ -s "$ETC/amqp_url" ]; then
        say "(re)starting $UNIT"
        systemctl restart "$UNIT"
    else
        say "next: put the RabbitMQ URL in $ETC/amqp_url (sudoedit $ETC/amqp_url),"
        say "      check $ETC/emdc.toml, then: sudo systemctl start $UNIT"
    fi
}

do_install() {
    check_prerequisites
    ensure_gpio_group
    ensure_user
    install_code
    install_config
    install_unit
    say "done; logs: journalctl -u $UNIT -f"
}

do_uninstall() {
    [ "$(id -u)" -eq 0 ] || die "run as root: sudo make uninstall-edge"
    local dir reload=
    if [ -e "$UNIT_FILE" ]; then
        systemctl disable --now "$UNIT" || true
        rm -f "$UNIT_FILE"
        reload=1
    fi
    if [ "$PURGE" = 1 ]; then
        for dir in "${DROP_INS[@]}"; do
            if [ -e "$dir" ]; then rm -rf "$dir"; reload=1; fi
        done
    fi
    if [ -n "$reload" ]; then
        systemctl daemon-reload
        systemctl reset-failed "$UNIT" 2>/dev/null || true
    fi
    rm -rf "$PREFIX"
    if [ "$PURGE" = 1 ]; then
        say "purging $ETC, $STATE, the unit's drop-ins and user $SERVICE_USER"
        if getent passwd "$SERVICE_USER" >/dev/null; then
            userdel "$SERVICE_USER"
        fi
        if [ -e "$GROUP_MARK" ]; then
            say "removing group gpio and its udev rule (added by the install)"
            rm -f "$UDEV_RULE"
            if getent group gpio >/dev/null; then groupdel gpio; fi
        fi
        rm -rf "$ETC" "$STATE"
    else
        say "kept $ETC, $STATE, the unit's drop-ins and user $SERVICE_USER (PURGE=1 removes them)"
    fi
}

case "${1:-}" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "usage: $0 install|uninstall" ;;
esac
