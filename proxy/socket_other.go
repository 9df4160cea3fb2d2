//go:build !linux

package proxy

import (
	"net"
	"syscall"
)

// ackedBytes: the socket is not looked at; writeBehind's stall bound then
// covers each write whole.
func ackedBytes(net.Conn) func() (uint64, bool) { return nil }

// peekReadable is not used: rawConnOf finds no socket, so idle connections to
// Cells are not peeked at and websocket pumps wait inside their reads.
func peekReadable(uintptr) bool { return true }

func rawConnOf(syscall.Conn) syscall.RawConn { return nil }

// waitReader has nothing to keep where the socket is not looked at.
type waitReader struct{}

func newWaitReader(net.Conn) *waitReader { return &waitReader{} }

// readNotifying calls before, then reads: without a look at the socket, the
// upload's copy sends what it holds before every read of the socket, and so
// does a download's (download.go).
func (w *waitReader) readNotifying(c net.Conn, p []byte, before func()) (int, error) {
	before()
	return c.Read(p)
}
