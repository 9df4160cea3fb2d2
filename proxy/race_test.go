//go:build race

package proxy

// raceEnabled is true when the tests run under the race detector, which
// makes byte-crunching loops about ten times slower: heavy tests shrink.
const raceEnabled = true
