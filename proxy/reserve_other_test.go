//go:build !linux

package proxy

import (
	"net"
	"testing"
)

// reservePort is a 127.0.0.1 address with a port nothing listens on now.
// Unlike Linux's (reserve_linux_test.go) it does not hold the port: another
// listener may be given it before the test uses it.
func reservePort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
