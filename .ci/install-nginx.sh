#!/usr/bin/env bash
# Install Debian's nginx for the deploy router (each router runs its own nginx with
# -p/-c on a loopback port), and stop and disable the system service the package may
# have started: it is not used, and it would hold port 80. Quiet; safe to re-run.
set -euo pipefail

if ! command -v nginx >/dev/null 2>&1; then
    # apt and debconf chatter even with -qq: show their output only if the install fails.
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; } \
        >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
fi

# Only the package's instance: the one whose pid is in the default config's pid file.
start-stop-daemon --stop --quiet --oknodo --pidfile /run/nginx.pid --exec "$(command -v nginx)" \
    --retry QUIT/5/TERM/5/KILL/5
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled --quiet nginx 2>/dev/null; then
    systemctl disable --quiet nginx 2>/dev/null
fi
