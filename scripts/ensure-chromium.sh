#!/bin/sh
# Install Debian's chromium for the browser tests when it is missing and we can.
# Never downloads a browser build of its own; if this fails the browser tests skip loudly.
set -u
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's chromium for the browser tests..."
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
        exit 0
    fi
fi
echo "WARNING: Chromium is not installed and could not be installed here;" >&2
echo "WARNING: the browser tests will be SKIPPED (apt-get install chromium to run them)." >&2
exit 0
