# Shared by deploy/local.sh and deploy/test.sh (sourced, not run).

# ensure_deps PKG...: installs the Debian packages that are missing (as
# root), or prints the apt command to run and exits (otherwise).
ensure_deps() {
    command -v dpkg-query >/dev/null 2>&1 || {
        echo "note: not a Debian system; make sure these are installed: $*" >&2
        return 0
    }
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    if [[ "$(id -u)" -eq 0 ]]; then
        echo "installing missing packages: ${missing[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    else
        echo "missing packages: ${missing[*]}" >&2
        echo "install them with:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
}

# ensure_cargo: puts rustup's cargo on PATH if needed, or exits.
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
}
