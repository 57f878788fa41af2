#!/usr/bin/env bash
# The native load generators the serving benchmark drives: wrk (REST) and h2load (gRPC, nghttp2-client).
set -euo pipefail
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
  echo "conveyor: the benchmarks need ${missing[*]}: install them with your package manager" >&2
  exit 2
fi
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
echo "conveyor: installing ${missing[*]} (apt-get)"
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
