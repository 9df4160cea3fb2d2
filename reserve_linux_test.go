package main

import (
	"net"
	"strconv"
	"syscall"
	"testing"
)

// reservePort is a 127.0.0.1 address whose port a socket bound with
// SO_REUSEADDR, never listening, holds until the test ends. Connections to
// it are refused, as to a free port. The kernel does not hand a port held
// so to a bind to port 0 or to an outgoing connection, in this process or
// another, yet a listener with SO_REUSEADDR (every Go listener: the
// binary's) may bind it and listen there (socket(7): only "an active
// listening socket bound to the address" stops such a bind).
//
// A port found by listening on port 0 and closing the listener was free
// only for that moment: the kernel gave it again to the next bind to port
// 0, of any process. CI once got the same port for PROXY_HTTPS_ADDR and
// PYDIO_GRPC_EXTERNAL, and while the proxy package's tests run beside
// these (go test ./...), any of their listeners may get it.
func reservePort(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
}
