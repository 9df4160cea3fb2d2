//go:build !linux

package proxy

import (
	"net"
	"syscall"
)

// peekReadable is not used: rawConnOf finds no socket, so idle connections to
// Cells are not peeked at and websocket pumps wait inside their reads.
func peekReadable(uintptr) bool { return true }

func rawConnOf(syscall.Conn) syscall.RawConn { return nil }

// readNotifying calls before, then reads: without a look at the socket, the
// upload's copy sends what it holds before every read of the socket.
func readNotifying(c net.Conn, p []byte, before func()) (int, error) {
	before()
	return c.Read(p)
}
