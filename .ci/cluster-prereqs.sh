#!/usr/bin/env bash
# What `make cluster-test` needs before the stack can start, on a machine with nothing
# installed and no image registry in reach (run as root, idempotent):
#   - Debian's docker.io, debootstrap and iproute2 (ss), if missing;
#   - a Docker daemon: started by hand (no systemd) unless one answers already;
#   - the offline base image, Debian bookworm (python 3.11, a venv on PATH) made with
#     debootstrap and `docker import`, cached by a tag that hashes this script;
#   - the CPU torch 2.13.0 wheel that pip finds on this machine, copied into the
#     git-ignored .whl/ of the build context, so the image never pulls CUDA torch.
# Prints the variables the compose override needs (MODLOSS_BASE_IMAGE=...) on stdout.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
log() { echo "cluster-prereqs: $*" >&2; }

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >&2
fi

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log: /var/log/modloss-dockerd.log)"
    $sudo setsid nohup dockerd >/var/log/modloss-dockerd.log 2>&1 </dev/null &
    echo $! >/var/run/modloss-dockerd.pid
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { log "dockerd did not start; see /var/log/modloss-dockerd.log"; exit 1; }
fi

# The base image: rebuilt only when this script or the CA bundle copied into it changes.
tag="modloss-base:bookworm-$(cat "$self" /etc/ssl/certs/ca-certificates.crt | sha256sum | cut -c1-12)"
if ! docker image inspect "$tag" >/dev/null 2>&1; then
    log "building $tag with debootstrap"
    root=$(mktemp -d)
    trap '$sudo rm -rf "$root"' EXIT
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    $sudo debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >/tmp/modloss-debootstrap.log 2>&1 ||
        { tail -20 /tmp/modloss-debootstrap.log >&2; exit 1; }
    # The same apt sources as the host (security updates included).
    [ -f /etc/apt/sources.list.d/debian.sources ] &&
        $sudo cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/"
    # This machine's CA bundle: where TLS to PyPI is intercepted, pip in the builds needs it.
    $sudo cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    $sudo chroot "$root" python3 -m venv /opt/venv
    $sudo rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    $sudo tar -C "$root" -c . | docker import \
        -c 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' -c 'CMD ["bash"]' - "$tag" >&2
fi

# The CPU torch wheel, where pip on this machine finds it.
mkdir -p .whl
if ! compgen -G ".whl/torch-2.13.0+cpu-cp311-*.whl" >/dev/null; then
    log "fetching the CPU torch 2.13.0 wheel into .whl/"
    # --no-index first: pip's configured find-links (here /opt/wheels) answer at once.
    for extra in "--no-index" "" "--extra-index-url https://download.pytorch.org/whl/cpu"; do
        # shellcheck disable=SC2086
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 -d .whl $extra "torch==2.13.0+cpu" >&2 2>/dev/null && break
    done
fi
compgen -G ".whl/torch-2.13.0+cpu-cp311-*.whl" >/dev/null ||
    { log "no CPU torch 2.13.0 cp311 wheel in .whl/"; exit 1; }

echo "MODLOSS_BASE_IMAGE=$tag"
