#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages, then a venv
# with lazyerofs installed in editable mode. Safe to run again; quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  fuse3 libfuse3-dev pkg-config   # pyfuse3 compiles against libfuse3
  erofs-utils                     # mkfs.erofs, fsck.erofs
  docker-registry apache2-utils   # a real OCI registry (+ htpasswd) for tests
  cryptsetup-bin                  # veritysetup: userspace dm-verity checks
  zstd                            # the plain zstd CLI, for interop tests
  util-linux curl                 # losetup, mount; curl for raw registry calls in tests
  debootstrap                     # the benchmark's Debian rootfs
  containerd runc                 # the snapshotter's end-to-end tests and benchmark
  skopeo                          # images in other formats (OCI layouts) for convert tests
  faketime                        # libfaketime: clock jumps seen by one daemon, not the machine
  python3-venv python3-dev gcc
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  [[ "$p" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# docker-registry's Debian package starts a system instance on :5000; tests and
# the demo start their own on free ports, so stop it to keep the port free.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.lazyerofs-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing lazyerofs and test tools into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# An editable install has no compiled bytecode, and environments that set
# PYTHONDONTWRITEBYTECODE would compile every module again in each command
# (~0.15 s per mount): compile once here (the import system reads it back).
.venv/bin/python -m compileall -q lazyfs cache >/dev/null
