#!/usr/bin/env bash
# Benchmark of cells-proxy against direct access, nginx and HAProxy (issue 5).
#
#   bench/run.sh            full run: 3 rounds, about 12 minutes on 2 cores
#   QUICK=1 bench/run.sh    1 round, shorter loads, about 3 minutes
#
# Environment:
#   QUICK=1        short run
#   TARGETS=a,b    subset of direct,cells-proxy,nginx-classic,nginx-tuned,haproxy
#   SCENARIOS=a,b  subset of idle,download,upload,websocket,tls,http1,rest,http2,grpc-unary,grpc-bidi-1,grpc-bidi-8
#   OUT=FILE       also write the markdown report there (default bench/results/<date>.md)
#   WORK=DIR       scratch directory (default: a new one under /tmp, removed at the end)
#   INSTALL=0      do not apt-get install missing tools
#
# Needs Linux, Go, and root for apt-get (or wrk, h2load, nginx, haproxy, curl
# and openssl already installed). Everything runs on 127.0.0.1. Not part of the test
# suite.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

missing=()
for tool in wrk:wrk h2load:nghttp2-client nginx:nginx haproxy:haproxy curl:curl openssl:openssl; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "${INSTALL:-1}" = 0 ]; then
		echo "missing tools: ${missing[*]}" >&2
		exit 1
	fi
	echo "installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	# The packages start system services on port 80; the benchmark runs its own instances.
	for svc in nginx haproxy; do
		if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
	done
fi

# 2,000 websockets are 4,000 sockets in the proxy and 2,000 in each end.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

keep_work=1
if [ -z "${WORK:-}" ]; then
	WORK=$(mktemp -d /tmp/cells-bench.XXXXXX)
	keep_work=0
fi
mkdir -p "$WORK/bin"
cleanup() {
	if [ -n "${worktree:-}" ]; then git -C "$repo" worktree remove --force "$worktree" >/dev/null 2>&1 || true; fi
	if [ "$keep_work" = 0 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "building into $WORK/bin" >&2
export CGO_ENABLED=0
go build -trimpath -o "$WORK/bin/" ./cmd/stub-upstream ./bench/grpcload ./bench/wsload ./bench/harness
# cells-proxy as it ships. If the working tree does not compile (someone is
# mid-edit), build the last commit instead and say so.
proxy_src="working tree"
if ! go build -trimpath -ldflags="-s -w" -o "$WORK/bin/cells-proxy" . 2>"$WORK/build.log"; then
	worktree="$WORK/src"
	git worktree add --detach "$worktree" HEAD >/dev/null 2>&1
	proxy_src="commit $(git rev-parse --short HEAD) (working tree did not build)"
	(cd "$worktree" && go build -trimpath -ldflags="-s -w" -o "$WORK/bin/cells-proxy" .) 2>>"$WORK/build.log" ||
		{ echo "cells-proxy does not build; its column will show failed" >&2; proxy_src="does not build"; }
fi
echo "cells-proxy: $proxy_src" >&2

mkdir -p bench/results
out=${OUT:-bench/results/$(date +%Y%m%d-%H%M%S).md}
args=(-bin "$WORK/bin" -work "$WORK" -out "$out")
[ "${QUICK:-0}" = 1 ] && args+=(-quick)
[ -n "${TARGETS:-}" ] && args+=(-targets "$TARGETS")
[ -n "${SCENARIOS:-}" ] && args+=(-scenarios "$SCENARIOS")

{
	echo "# cells-proxy benchmark $(date -u +%Y-%m-%dT%H:%MZ)"
	echo
	echo "Command: \`${QUICK:+QUICK=$QUICK }bench/run.sh\`; cells-proxy from the $proxy_src ($(git rev-parse --short HEAD)); $(go version | cut -d' ' -f3);"
	echo "wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), $(h2load --version | head -1), nginx $(nginx -v 2>&1 | sed 's/.*\///'), HAProxy $(haproxy -v | head -1 | awk '{print $3}'), $(curl --version | head -1 | cut -d' ' -f1-2)."
} >"$WORK/header.md"

"$WORK/bin/harness" "${args[@]}"
# Prepend the header to the saved report.
cat "$WORK/header.md" "$out" >"$out.tmp" && mv "$out.tmp" "$out"
echo "report written to $out" >&2
