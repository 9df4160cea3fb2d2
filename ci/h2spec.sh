#!/usr/bin/env bash
# ci/h2spec.sh: HTTP/2 conformance of cells-proxy with h2spec (github.com/summerwind/h2spec).
#
#   bash ci/h2spec.sh
#
# Installs h2spec with `go install` into a temporary GOBIN, builds cells-proxy and cmd/stub-upstream, starts
# the stub as a TLS upstream (it drains request bodies and answers 200) and cells-proxy in front of it on
# 127.0.0.1 with the dedicated gRPC port on, then runs every h2spec case (-t -k: TLS, self-signed
# certificate) against the public port and against the gRPC port. Prints h2spec's summary for each port and
# exits non-zero if any case fails. About 30 seconds.
#
# Three cases pass only thanks to proxy/h2conn.go, the filter in front of net/http's HTTP/2 server:
# http2/6.5.3/1 (a SETTINGS frame that repeats a setting), http2/8.1.2.2/1 and /2 (connection-specific
# header fields and TE other than "trailers" must be reset with PROTOCOL_ERROR, not answered with 400).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/local/go/bin:$PATH
# v2.2.1 is h2spec's last release; it has no go.mod, so its dependencies resolve to their latest versions.
H2SPEC_VERSION=${CELLS_PROXY_H2SPEC_VERSION:-v2.2.1+incompatible}

# shellcheck source=ci/lib.sh
source "$ROOT/ci/lib.sh"
die() {
	printf 'FAIL: %s\n' "$*"
	exit 1
}

step "install h2spec $H2SPEC_VERSION"
GOBIN=$TMP/bin go install "github.com/summerwind/h2spec/cmd/h2spec@$H2SPEC_VERSION"
H2SPEC=$TMP/bin/h2spec
"$H2SPEC" --version

step "build and start the upstream and cells-proxy"
start_upstream
start_proxy proxy

# failed_ids JUNIT: the IDs (http2/6.5.3/1) of the failed cases, one a line. h2spec numbers the cases of
# a section from 1 in the order it runs them, as its own output does.
failed_ids() {
	awk '
		/<testcase / {
			match($0, /package="[^"]*"/)
			pkg = substr($0, RSTART + 9, RLENGTH - 10)
			cur = pkg "/" (++n[pkg])
		}
		/<(error|failure)[ >]/ { print cur }
	' "$1" | sort -u
}

status=0
for target in "public:$MAIN" "grpc:$GRPC"; do
	name=${target%%:*} port=${target#*:}
	step "h2spec against the $name port (127.0.0.1:$port)"
	# h2spec exits 1 on any failure; what counts is decided below.
	"$H2SPEC" -t -k -h 127.0.0.1 -p "$port" -o 5 -j "$TMP/$name.xml" >"$TMP/$name.out" 2>&1 || true
	sed -n '/^Failures:/,$p' "$TMP/$name.out"
	grep -q 'tests, ' "$TMP/$name.out" || {
		cat "$TMP/$name.out"
		die "h2spec did not complete against the $name port"
	}
	grep -E '^[0-9]+ tests, ' "$TMP/$name.out"
	for id in $(failed_ids "$TMP/$name.xml"); do
		echo "FAIL: $name port: $id"
		status=1
	done
done

if [ "$status" -ne 0 ]; then
	echo
	echo "cells-proxy log:"
	cat "$TMP/proxy.log"
	die "h2spec: unexpected failures"
fi
echo
echo "PASS: h2spec, public and gRPC ports: every case"
