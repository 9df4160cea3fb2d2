//go:build !linux

package proxy

// parkedPumps: elsewhere than on Linux, no pump is ever parked.
func parkedPumps(*tunnels) (int, bool) { return 0, false }

// tunnelParked: elsewhere than on Linux, an idle pump waits in its read.
func tunnelParked(*tunnels, string) bool { return true }
