#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test vmbackup.
# Idempotent: installs only what is missing. Called by `make dev`.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config libzstd-dev python3-venv curl
  qemu-utils nbdkit libnbd-bin openssl zstd xxhash restic borgbackup
  golang-go golang-github-vmware-govmomi-dev
  nginx  # the site test puts the shipped TLS proxy (deployments/nginx) in front of Prefect
)
# The Rust crates the mover uses, as the distribution packages them; used
# only when the public crate registry cannot be reached.
RUST_CRATE_PACKAGES=(
  librust-pyo3-dev librust-xxhash-rust-dev librust-zstd-dev librust-crossbeam-channel-dev
  librust-thiserror-dev librust-libc-dev librust-serde-dev librust-serde-derive-dev
  librust-serde-json-dev librust-proptest-dev librust-tempfile-dev
  librust-flate2-dev librust-flate2+miniz-oxide-dev
  librust-rustls-dev librust-rustls-pemfile-dev
  librust-blake3-dev librust-ring-dev
)

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
want=("${APT_PACKAGES[@]}" "${RUST_CRATE_PACKAGES[@]}")
command -v cargo >/dev/null 2>&1 || want+=(cargo rustc)
# The style gates of `make test`: rustup's components where rustup is there.
cargo fmt --version >/dev/null 2>&1 || want+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || want+=(rust-clippy)
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-dev: installing ${missing[*]}"
  sudo_ apt-get update -q
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# Cargo: the public registry if it answers, else the distribution's crates.
# The replacement is written to .cargo/config.toml (ignored by git), never committed.
marker="# written by tools/setup-dev.sh"
if curl -sSf -m 5 -o /dev/null https://index.crates.io/config.json 2>/dev/null; then
  if [ -f .cargo/config.toml ] && grep -q "$marker" .cargo/config.toml; then rm .cargo/config.toml; fi
else
  mkdir -p .cargo
  cat > .cargo/config.toml <<CFG
$marker: the public crate registry was unreachable,
# so crates come from the distribution's librust-*-dev packages.
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "/usr/share/cargo/registry"

[net]
offline = true
CFG
fi

# Python: a venv with the build backend and the test tools.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
