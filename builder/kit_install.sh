#!/bin/sh
# Install fieldpack on this device from this kit, with no network (made by `fieldpack kit`).
#
#   sh install.sh [--prefix DIR] [--data-dir DIR] [--bin-dir DIR] [--no-service] [--no-bundle] [--python PY]
#                 [--kit-sha256 H] [--print-unit]
#
#   --prefix DIR    where the virtualenv goes: DIR/venv   (env FIELDPACK_PREFIX; root: /opt/fieldpack,
#                   others: ~/.local/opt/fieldpack)
#   --data-dir DIR  device data dir: trusted keys, A/B slots (env FIELDPACK_DATA_DIR; root: /var/lib/fieldpack,
#                   others: ~/.local/share/fieldpack)
#   --bin-dir DIR   write the `fieldpack` command there: it runs PREFIX/venv's fieldpack with this data dir as
#                   its default (env FIELDPACK_BIN_DIR; with the default prefix: /usr/local/bin as root,
#                   ~/.local/bin otherwise; with a custom --prefix only when given; `--bin-dir ''`: none)
#   --no-service    do not install the systemd unit (env FIELDPACK_NO_SERVICE=1)
#   --no-bundle     leave the device's bundle as it is: upgrade the software only (env FIELDPACK_NO_BUNDLE=1)
#   --python PY     the Python @KIT_PYTHON@ to use (env PYTHON; default python@KIT_PYTHON@, then python3)
#   --print-unit    print the systemd unit as it would be installed, and exit
#   --kit-sha256 H  refuse unless kit.json's sha256 is H (printed by `fieldpack kit`; env FIELDPACK_KIT_SHA256)
#
# Order: Python and platform checks, then every file's sha256 against kit.json (a tampered or extra file
# stops it before anything is installed), then venv, `pip install --no-index --find-links wheels/` of the
# pinned set, the `fieldpack` command, data dir (trusted key), the bundle, and the systemd unit (root +
# systemd only).
# Idempotent: a second run upgrades the venv in place and keeps the data dir.
# Exit status: 0 done; 2 wrong Python/platform or bad option; 4 kit failed verification; 6 install failed.
set -eu

KIT_PYTHON=@KIT_PYTHON@
KIT_ARCH=@KIT_ARCH@
KIT_GLIBC=@KIT_GLIBC@
KIT_PLATFORM=@KIT_PLATFORM@
KIT=$(cd "$(dirname "$0")" && pwd)
UNIT_NAME=fieldpack-serve.service
SERVICE_USER=fieldpack

die() { code=$1; shift; printf 'error: %s\n' "$*" >&2; exit "$code"; }
say() { printf '%s\n' "$*"; }

if [ "$(id -u)" = 0 ]; then
    DEFAULT_PREFIX=/opt/fieldpack
    DATA_DIR=${FIELDPACK_DATA_DIR:-/var/lib/fieldpack}
    DEFAULT_BIN_DIR=/usr/local/bin
else
    DEFAULT_PREFIX=$HOME/.local/opt/fieldpack
    DATA_DIR=${FIELDPACK_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/fieldpack}
    DEFAULT_BIN_DIR=$HOME/.local/bin
fi
PREFIX=${FIELDPACK_PREFIX:-$DEFAULT_PREFIX}
BIN_DIR=${FIELDPACK_BIN_DIR-unset}
NO_SERVICE=${FIELDPACK_NO_SERVICE:-0}
NO_BUNDLE=${FIELDPACK_NO_BUNDLE:-0}
PY=${PYTHON:-}
PRINT_UNIT=0
KIT_SHA256=${FIELDPACK_KIT_SHA256:-}
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die 2 "--prefix needs a folder. Fix: sh install.sh --prefix /opt/fieldpack"
                  PREFIX=$2; shift 2 ;;
        --data-dir) [ $# -ge 2 ] || die 2 "--data-dir needs a folder. Fix: sh install.sh --data-dir /var/lib/fieldpack"
                  DATA_DIR=$2; shift 2 ;;
        --bin-dir) [ $# -ge 2 ] || die 2 "--bin-dir needs a folder (or '' for none). Fix: sh install.sh --bin-dir /usr/local/bin"
                  BIN_DIR=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die 2 "--python needs an interpreter. Fix: sh install.sh --python python$KIT_PYTHON"
                  PY=$2; shift 2 ;;
        --kit-sha256) [ $# -ge 2 ] || die 2 "--kit-sha256 needs the hash fieldpack kit printed"
                  KIT_SHA256=$2; shift 2 ;;
        --no-service) NO_SERVICE=1; shift ;;
        --no-bundle) NO_BUNDLE=1; shift ;;
        --print-unit) PRINT_UNIT=1; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die 2 "unknown option $1. Fix: sh install.sh --help" ;;
    esac
done
case $PREFIX in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
case $DATA_DIR in /*) ;; *) DATA_DIR=$(pwd)/$DATA_DIR ;; esac
# the command goes on PATH for a default install only: a custom prefix (a second install, a test) must not
# replace the system's `fieldpack` unless asked to
if [ "$BIN_DIR" = unset ]; then
    if [ "$PREFIX" = "$DEFAULT_PREFIX" ]; then BIN_DIR=$DEFAULT_BIN_DIR; else BIN_DIR=""; fi
fi
case $BIN_DIR in ""|/*) ;; *) BIN_DIR=$(pwd)/$BIN_DIR ;; esac
VENV=$PREFIX/venv

# The unit with this install's paths. A custom data dir is made writable with ReadWritePaths (StateDirectory
# only covers /var/lib/NAME). Without /etc/fieldpack/mqtt-password the broker login is anonymous.
render_unit() {
    sed -e "s#/opt/fieldpack/venv#$VENV#g" -e "s#/var/lib/fieldpack#$DATA_DIR#g" "$KIT/$UNIT_NAME" |
    if [ "$DATA_DIR" = /var/lib/fieldpack ]; then cat; else
        sed -e "s#^StateDirectory=.*#ReadWritePaths=$DATA_DIR#" -e '/^StateDirectoryMode=/d'; fi |
    if [ -f /etc/fieldpack/mqtt-password ]; then cat; else
        sed -e 's/^\(LoadCredential=mqtt-password\)/#(no password file at install: anonymous) \1/' \
            -e 's/^\(Environment=FIELDPACK_MQTT_PASSWORD_FILE\)/#(no password file at install: anonymous) \1/'; fi
}
if [ "$PRINT_UNIT" = 1 ]; then render_unit; exit 0; fi

# --- 1. Python and platform ------------------------------------------------------------------------------------
if [ -z "$PY" ]; then
    for cand in "python$KIT_PYTHON" python3; do
        if command -v "$cand" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
    done
fi
[ -n "$PY" ] || die 2 "no Python found; this kit is for Python $KIT_PYTHON. Fix: install python$KIT_PYTHON (with its venv module) on the device"
command -v "$PY" >/dev/null 2>&1 || die 2 "Python $PY not found. Fix: pass --python with the path of python$KIT_PYTHON"
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || die 2 "$PY does not run. Fix: pass --python with a working python$KIT_PYTHON"
[ "$have" = "$KIT_PYTHON" ] || die 2 "this kit is for Python $KIT_PYTHON but $PY is Python $have. Fix: build the kit with fieldpack kit --python $have, or pass --python with a python$KIT_PYTHON"
"$PY" - "$KIT_ARCH" "$KIT_GLIBC" "$KIT_PLATFORM" <<'EOF' || exit 2
import platform, sys
arch, need, plat = sys.argv[1], sys.argv[2], sys.argv[3]
here = platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")
lib, ver = platform.libc_ver()
fix = f"build the kit with fieldpack kit --platform manylinux_{ver.replace('.', '_') or 'X_Y'}_{here}"
if here != arch:
    sys.exit(f"error: this kit is for {arch} ({plat}) but this device is {here}. Fix: {fix}")
if lib != "glibc" or tuple(map(int, ver.split(".")[:2])) < tuple(map(int, need.split("."))):
    sys.exit(f"error: this kit needs glibc >= {need} ({plat}) but this device has {lib or 'no glibc'} {ver}. Fix: {fix}")
EOF
say "python: $PY ($have), platform $(uname -m) ok for $KIT_PLATFORM"

# --- 2. every file's sha256, before anything is installed ------------------------------------------------------
"$PY" - "$KIT" "$KIT_SHA256" <<'EOF' || exit 4
import hashlib, json, os, sys
kit, expect = sys.argv[1], sys.argv[2].strip().lower()
try:
    with open(os.path.join(kit, "kit.json"), "rb") as fh:
        raw = fh.read()
    files = json.loads(raw)["files"]
except (OSError, ValueError, KeyError) as exc:
    sys.exit(f"error: {kit}/kit.json is missing or unreadable ({exc}); nothing was installed. Fix: copy the whole kit again")
if expect and hashlib.sha256(raw).hexdigest() != expect:
    sys.exit(f"error: kit {kit} failed verification, nothing was installed: kit.json sha256 is not {expect}. "
             "Fix: copy the kit again from the build host")
bad = []
for rel, want in sorted(files.items()):
    path = os.path.join(kit, rel)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        bad.append(f"{rel} missing")
        continue
    if os.path.getsize(path) != want["size"] or h.hexdigest() != want["sha256"]:
        bad.append(f"{rel} sha256 differs")
for sub in ("wheels", "bundle", "trust"):  # an extra wheel would be picked up by --find-links
    for name in sorted(os.listdir(os.path.join(kit, sub))) if os.path.isdir(os.path.join(kit, sub)) else []:
        if f"{sub}/{name}" not in files:
            bad.append(f"{sub}/{name} not in kit.json")
if bad:
    sys.exit(f"error: kit {kit} failed verification, nothing was installed: {'; '.join(bad[:3])}"
             f"{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}. Fix: copy the kit again from the build host")
print(f"verified: {len(files)} files match kit.json (sha256)")
EOF

# --- 3. virtualenv and packages, from the kit only -------------------------------------------------------------
for v in $(env | sed -n 's/^\(PIP_[A-Z0-9_]*\)=.*/\1/p'); do unset "$v"; done  # no index/find-links from outside
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$KIT_PYTHON" ]; then
    action="upgraded in place"
else
    rm -rf "$VENV"
    mkdir -p "$PREFIX"
    "$PY" -m venv "$VENV" || die 6 "could not create a virtualenv at $VENV. Fix: install python$KIT_PYTHON-venv (Debian) or pick a writable --prefix"
    action="created"
fi
"$VENV/bin/python" -m pip install -q --no-index --find-links "$KIT/wheels" -r "$KIT/requirements.txt" \
    || die 6 "pip could not install the kit's wheels into $VENV (see above). Fix: check free space, then re-run install.sh"
# The kit's own fieldpack wheel wins even when the version number did not change.
"$VENV/bin/python" -m pip install -q --no-index --no-deps --force-reinstall "$KIT"/wheels/fieldpack-*.whl \
    || die 6 "pip could not install fieldpack into $VENV. Fix: re-run install.sh"
FP=$VENV/bin/fieldpack
say "venv: $VENV $action ($(wc -l < "$KIT/requirements.txt" | tr -d ' ') packages, $(grep '^fieldpack==' "$KIT/requirements.txt"))"

# --- 3b. the `fieldpack` command on PATH -------------------------------------------------------------------------
# A two-line wrapper, not a link: it also makes this install's data dir the default (FIELDPACK_DATA_DIR, unless
# the caller sets one), so `fieldpack ask ...` on the device needs no --data-dir. A file there that this script
# did not write is left alone.
MARK="# fieldpack command written by the offline kit's install.sh"
CMD=$FP
if [ -n "$BIN_DIR" ]; then
    if [ -e "$BIN_DIR/fieldpack" ] && ! grep -qx "$MARK" "$BIN_DIR/fieldpack" 2>/dev/null; then
        say "command: $BIN_DIR/fieldpack exists and is not ours; left as is (this install's is $FP)"
    else
        mkdir -p "$BIN_DIR" || die 6 "could not create $BIN_DIR. Fix: pick a writable --bin-dir, or --bin-dir ''"
        printf '#!/bin/sh\n%s\n: "${FIELDPACK_DATA_DIR:=%s}"\nexport FIELDPACK_DATA_DIR\nexec "%s" "$@"\n' \
            "$MARK" "$DATA_DIR" "$FP" > "$BIN_DIR/.fieldpack.tmp" \
            && chmod 0755 "$BIN_DIR/.fieldpack.tmp" && mv -f "$BIN_DIR/.fieldpack.tmp" "$BIN_DIR/fieldpack" \
            || die 6 "could not write $BIN_DIR/fieldpack. Fix: pick a writable --bin-dir, or --bin-dir ''"
        CMD=$BIN_DIR/fieldpack
        case ":$PATH:" in
            *":$BIN_DIR:"*) say "command: fieldpack ($BIN_DIR/fieldpack; default data dir $DATA_DIR)" ;;
            *) say "command: $BIN_DIR/fieldpack (default data dir $DATA_DIR); $BIN_DIR is not on PATH here: add it, or run it by path" ;;
        esac
    fi
fi

# --- 4. data dir, trusted key, bundle --------------------------------------------------------------------------
set -- "$KIT"/trust/*.pub
if [ -e "$1" ]; then
    trust_args=""
    for k in "$@"; do trust_args="$trust_args --trust $k"; done
    # shellcheck disable=SC2086  # key paths come from the kit (no spaces: file names written by fieldpack kit)
    "$FP" device init --data-dir "$DATA_DIR" $trust_args || die 6 "could not initialise $DATA_DIR (see above)"
    say "data dir: $DATA_DIR (trusting $# key(s) from the kit)"
elif [ -f "$DATA_DIR/state.json" ] || [ -d "$DATA_DIR/trust" ]; then
    say "data dir: $DATA_DIR kept (no key in the kit)"
else
    say "data dir: not initialised (no key in the kit). Next: $FP device init --data-dir $DATA_DIR --trust builder.pub"
fi
set -- "$KIT"/bundle/*.fpk
if [ -e "$1" ] && [ "$NO_BUNDLE" = 1 ]; then
    say "bundle: $(basename "$1") skipped (--no-bundle); the device keeps what it runs"
elif [ -e "$1" ]; then
    # a re-run on a device that moved on to another bundle: the software above is upgraded, the kit's bundle is
    # refused (an older version or another name); say how to finish without it
    "$FP" install "$1" --data-dir "$DATA_DIR" || die 6 "installing $(basename "$1") into $DATA_DIR failed (see above); \
the software is installed. Fix: to keep the device's bundle, run again with --no-bundle"
    say "bundle: $(basename "$1") installed into $DATA_DIR"
fi

# --- 5. systemd unit -------------------------------------------------------------------------------------------
if [ "$NO_SERVICE" = 1 ]; then
    say "service: skipped (--no-service)"
elif [ ! -d /run/systemd/system ]; then
    say "service: skipped (systemd is not running here); start the daemon with: $FP serve --broker mqtt://HOST:1883 --device-id ID --data-dir $DATA_DIR"
elif [ "$(id -u)" != 0 ]; then
    say "service: skipped (not root); re-run as root to install $UNIT_NAME"
else
    id "$SERVICE_USER" >/dev/null 2>&1 || useradd --system --home-dir "$DATA_DIR" --shell /usr/sbin/nologin "$SERVICE_USER"
    install -d -m 0750 -o root -g "$SERVICE_USER" /etc/fieldpack
    if [ ! -f /etc/fieldpack/serve.env ]; then
        printf '%s\n' '# fieldpack serve settings (see fieldpack serve --help); the service starts once FIELDPACK_BROKER is set.' \
            '#FIELDPACK_BROKER=mqtts://broker.local:8883' "#FIELDPACK_DEVICE_ID=$(hostname)" '#FIELDPACK_GROUP=line-3' \
            '#FIELDPACK_MQTT_USERNAME=' '#FIELDPACK_MQTT_TLS_CA=/etc/fieldpack/ca.pem' > /etc/fieldpack/serve.env
        chmod 0640 /etc/fieldpack/serve.env && chgrp "$SERVICE_USER" /etc/fieldpack/serve.env
    fi
    [ -d "$DATA_DIR" ] && chown -R "$SERVICE_USER:$SERVICE_USER" "$DATA_DIR"
    render_unit > "/etc/systemd/system/.$UNIT_NAME.tmp" && mv "/etc/systemd/system/.$UNIT_NAME.tmp" "/etc/systemd/system/$UNIT_NAME"
    systemctl daemon-reload
    systemctl enable "$UNIT_NAME" >/dev/null 2>&1 || die 6 "systemctl enable $UNIT_NAME failed. Fix: see journalctl -xe"
    if grep -q '^FIELDPACK_BROKER=.' /etc/fieldpack/serve.env; then
        systemctl restart "$UNIT_NAME" || die 6 "$UNIT_NAME did not start. Fix: journalctl -u $UNIT_NAME"
        say "service: $UNIT_NAME installed, enabled and (re)started"
    else
        say "service: $UNIT_NAME installed and enabled (starts on boot). Next: set FIELDPACK_BROKER in /etc/fieldpack/serve.env, then systemctl start $UNIT_NAME"
    fi
fi
say "done: fieldpack is $CMD"
