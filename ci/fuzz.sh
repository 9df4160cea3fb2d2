#!/usr/bin/env bash
# Runs each fuzz target of ./proxy for a bounded number of inputs (FUZZTIME,
# default 40000x: 5 to 60 s per target on two cores; fourteen targets, about
# nine minutes with the builds). Four targets send each input through the
# proxy with a body, a stream or a websocket to check byte for byte, and
# take fewer inputs: FuzzWebSocketTunnel 10000 (about 45 s), FuzzUpload 5000
# (about 45 s), FuzzDownload 20000 (about 35 s), FuzzGRPCStream 10000 (about
# 30 s). The committed corpus in proxy/testdata/fuzz/ runs first; a failure
# leaves the failing input there, to be committed with the fix.
#
# A count, not a duration: with a duration, Go's fuzzing coordinator can
# report its own deadline as a failure ("context deadline exceeded", no
# failing input) when a worker is mid-input as the time runs out
# (golang/go#75804, fixed in Go 1.27). A count has no such deadline.
#
# -fuzzminimizetime 10s: the fuzzer shrinks every new interesting input for
# up to 60 s by default, running it again and again, and an input of
# FuzzFrontConn that waits for PROXY_READ_HEADER_TIMEOUT (2 s there) takes
# seconds a try. A CI run at 5735c2e stood 54 s with no input counted, next
# to a new interesting one (12-20 s for the whole target otherwise). CI
# keeps no corpus; a failing input is still shrunk, for 10 s.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-40000x}
targets=$(go test ./proxy -list '^Fuzz' | grep '^Fuzz')
for t in $targets; do
	n=$fuzztime
	if [ -z "${FUZZTIME:-}" ]; then
		case $t in
		FuzzWebSocketTunnel) n=10000x ;;
		FuzzUpload) n=5000x ;;
		FuzzDownload) n=20000x ;;
		FuzzGRPCStream) n=10000x ;;
		esac
	fi
	echo "=== $t ($n)"
	go test ./proxy -run '^$' -fuzz "^$t\$" -fuzztime "$n" -fuzzminimizetime 10s -parallel 2
done
