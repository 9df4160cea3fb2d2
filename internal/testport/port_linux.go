package testport

import (
	"net"
	"strconv"
	"syscall"
	"testing"
)

// Reserve is a 127.0.0.1 address whose port a socket bound with
// SO_REUSEADDR, never listening, holds until the test ends. Connections to
// it are refused, as to a free port. The kernel does not hand a port held
// so to a bind to port 0 or to an outgoing connection, in this process or
// another, yet a listener with SO_REUSEADDR (every Go listener: the
// binary's too) may bind it and listen there, again and again (socket(7):
// only "an active listening socket bound to the address" stops such a
// bind).
func Reserve(t testing.TB) string {
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
