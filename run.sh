#!/usr/bin/env bash
# mmutrace's single entry point for set-up and the README's jobs.
#
#   ./run.sh demo   set up, check the host, record a built-in scenario, replay it, write the HTML report
#   ./run.sh test   set up, run the test suite
#   ./run.sh setup  set up only (idempotent; a few seconds when everything is already there)
#
# Set-up installs what is missing and nothing else: Debian packages (bcc, kernel headers, chromium
# for the report's browser test), a header tree for BCC_KERNEL_SOURCE matching the running kernel as
# closely as Debian allows, and a venv made from Debian's python3 with --system-site-packages (bcc's
# Python module lives in Debian's dist-packages; the PyPI project called "bcc" is unrelated).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
APT_PKGS=(python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv python3-pip kmod chromium)
HEADERS=/var/cache/mmutrace/headers-$(uname -r)

log() { printf '[run.sh] %s\n' "$*" >&2; }

need_apt() {
    local missing=()
    for p in "${APT_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if [ "$(id -u)" != 0 ]; then
            log "missing Debian packages: ${missing[*]}; run this as root (or: sudo apt-get install ${missing[*]})"
            exit 2
        fi
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# bcc compiles against kernel headers; Debian ships none for this host's kernel, so merge the
# -common and -amd64 trees of the installed linux-headers-amd64 into one folder (symlinks only).
need_headers() {
    [ -e "/lib/modules/$(uname -r)/build/include" ] && { HEADERS=/lib/modules/$(uname -r)/build; return; }
    [ -f "$HEADERS/.complete" ] && return
    local arch common
    arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=${arch%-amd64}-common
    if [ -z "$arch" ] || [ ! -d "$common" ]; then
        log "no Debian kernel headers under /usr/src (linux-headers-amd64 not installed?)"; exit 2
    fi
    log "building the bcc header tree $HEADERS from $(basename "$common") + $(basename "$arch")"
    rm -rf "$HEADERS"; mkdir -p "$HEADERS"
    cp -as "$common/." "$HEADERS/"
    cp -as --remove-destination "$arch/." "$HEADERS/"
    touch "$HEADERS/.complete"
}

need_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV from /usr/bin/python3 (--system-site-packages, for bcc)"
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    local stamp=$VENV/.mmutrace-installed want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing mmutrace and its Python dependencies into $VENV"
        # pip's output goes to a log (it can be long); it is shown only when the install fails.
        if ! { "$VENV/bin/python" -m pip install -q --upgrade pip && "$VENV/bin/python" -m pip install -q -e ".[test]"; } \
                >"$VENV/pip.log" 2>&1; then
            cat "$VENV/pip.log" >&2; log "pip install failed (log above, also in $VENV/pip.log)"; exit 2
        fi
        echo "$want" > "$stamp"
    fi
}

setup() {
    need_apt
    need_headers
    need_venv
    export BCC_KERNEL_SOURCE=${BCC_KERNEL_SOURCE:-$HEADERS}
    export PATH=$VENV/bin:$PATH
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup) setup ;;
    demo)
        setup
        out=${MMUTRACE_OUT:-$ROOT/out}
        mkdir -p "$out"
        mmutrace doctor
        mmutrace record --scenario touch --output "$out/demo.parquet" --force
        mmutrace replay "$out/demo.parquet" || log "replay found divergences (see above)"
        mmutrace report "$out/demo.parquet" --replay -o "$out/demo.html"
        log "report: $out/demo.html"
        ;;
    test)
        setup
        exec python -m pytest "$@"
        ;;
    *) echo "usage: ./run.sh demo|test|setup [pytest args]" >&2; exit 2 ;;
esac
