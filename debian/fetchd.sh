#!/bin/sh
# /usr/bin/fetchd of the Debian package: fetchd runs in its private Python environment in
# /usr/lib/fetchd. -I: no PYTHON* variable, user site directory or working directory reaches it.
exec /usr/lib/fetchd/bin/python3 -I -m fetchd "$@"
