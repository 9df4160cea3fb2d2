//go:build !linux

package proxy

import "syscall"

// peekReadable is not used: rawConnOf finds no socket, so idle connections to
// Cells are not peeked at and websocket pumps wait inside their reads.
func peekReadable(uintptr) bool { return true }

func rawConnOf(syscall.Conn) syscall.RawConn { return nil }

// waitReader has nothing to keep where the socket is not looked at.
type waitReader struct{}

// readNotifying calls before, then reads: without a look at the socket, the
// upload's copy sends what it holds before every read of the socket.
func (c *clientSocket) readNotifying(p []byte, before func()) (int, error) {
	before()
	return c.Conn.Read(p)
}
