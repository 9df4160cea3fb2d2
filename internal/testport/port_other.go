//go:build !linux

package testport

import (
	"net"
	"sync"
	"testing"
)

// handedOut holds the ports Reserve has returned in this test process.
var handedOut struct {
	sync.Mutex
	ports map[string]bool
}

// Reserve is a 127.0.0.1 address with a port nothing listens on now, and
// one it has not returned before. Unlike Linux's it does not hold the
// port: another process may be given it before the test listens there.
func Reserve(t testing.TB) string {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	if handedOut.ports == nil {
		handedOut.ports = make(map[string]bool)
	}
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if !handedOut.ports[addr] {
			handedOut.ports[addr] = true
			return addr
		}
	}
	t.Fatal("no port not handed out before in 100 tries")
	return ""
}
