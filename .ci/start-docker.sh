#!/usr/bin/env bash
# Start the Docker engine the docker-marked tests and the `docker` deploy target use, and
# build the base image of generated release images. Quiet; safe to re-run (a second call
# finds the engine answering and the image present, and does nothing).
#
# --bridge=none --iptables=false --ip-masq=false: no default bridge on 172.17.0.0/16
#   (private ranges are not reachable from these machines); containers use --network host.
# --live-restore: containers keep running while the engine is down, so an engine stopped
#   mid-deploy leaves the environment serving its previous version.
set -euo pipefail

base_image=${CICD_BASE_IMAGE:-cicd-python:3.11}
pidfile=/run/cicd-dockerd.pid
logfile=/var/log/cicd-dockerd.log

quiet() {
    # apt and debconf chatter even with -qq: show their output only if the command fails.
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

# dockerd and the engine's client, debootstrap for the base image, busybox for the tiny
# images of the tests' own engines.
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
dpkg-query -W busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
    quiet apt-get update -qq
    quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if ! docker info >/dev/null 2>&1; then
    # setsid: the engine outlives this script and the shell that ran it.
    setsid dockerd --bridge=none --iptables=false --ip-masq=false --live-restore \
        --pidfile "$pidfile" </dev/null >>"$logfile" 2>&1 &
    ready=0
    for _ in $(seq 120); do
        if docker info >/dev/null 2>&1; then
            ready=1
            break
        fi
        sleep 0.5
    done
    if [ "$ready" != 1 ]; then
        echo "the Docker engine did not answer within 60s; see $logfile:" >&2
        tail -n 20 "$logfile" >&2
        exit 1
    fi
fi

if ! docker image inspect "$base_image" >/dev/null 2>&1; then
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    quiet debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        - "$base_image" >/dev/null
fi
