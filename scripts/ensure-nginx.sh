#!/bin/sh
# Install Debian's nginx for the topology drills (scripts/topology.sh) when it is missing
# and we can. The package's own daemon is never left running: the drills start nginx
# as the current user, on a free port, with a configuration of their own. If this fails
# the topology drills skip loudly.
set -u
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's nginx for the topology drills..."
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; then
        # Debian starts the packaged site on port 80 where it can; we want none of it.
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable --now nginx >/dev/null 2>&1 || true
        elif [ -f /run/nginx.pid ]; then
            /usr/sbin/nginx -s quit 2>/dev/null || true
        fi
        exit 0
    fi
fi
echo "WARNING: nginx is not installed and could not be installed here;" >&2
echo "WARNING: the topology drills (tests/test_drill_topology.py) will be SKIPPED" >&2
echo "WARNING: (apt-get install nginx to run them)." >&2
exit 0
