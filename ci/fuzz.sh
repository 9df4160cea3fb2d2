#!/usr/bin/env bash
# Runs each fuzz target of ./proxy for a short while (FUZZTIME, default 15s;
# five targets: about two minutes with the builds). The committed corpus in
# proxy/testdata/fuzz/ runs first; a failure leaves the failing input there,
# to be committed with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-15s}
targets=$(go test ./proxy -list '^Fuzz' | grep '^Fuzz')
for t in $targets; do
	echo "=== $t ($fuzztime)"
	go test ./proxy -run '^$' -fuzz "^$t\$" -fuzztime "$fuzztime" -parallel 2
done
