#!/bin/bash
# touchpoint-healthz [HOST:PORT]: exits 0 when the process answers GET /healthz with 200 on
# its metrics port (default: the port of TOUCHPOINT_METRICS_LISTEN, on 127.0.0.1).
# bash's /dev/tcp only: the runtime image has no curl.
set -euo pipefail
addr="${1:-${TOUCHPOINT_METRICS_LISTEN:-127.0.0.1:9464}}"
port="${addr##*:}"
host="${addr%:*}"
case "$host" in
  "" | 0.0.0.0 | "[::]" | "::") host=127.0.0.1 ;;
esac
exec 3<>"/dev/tcp/${host}/${port}"
printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3
IFS= read -r -t 5 status <&3
[[ "$status" =~ ^HTTP/1\.[01]\ 200 ]]
