//go:build !race

package proxy

// raceEnabled is true under the race detector, which makes heavy tests
// several times slower: they use smaller sizes then.
const raceEnabled = false
