#!/usr/bin/env bash
# The GPU device script lives in studies/device/ (not part of the installed package); this
# path is kept because the developers' guide names it. Same arguments, same environment.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../studies/device/run.sh" "$@"
