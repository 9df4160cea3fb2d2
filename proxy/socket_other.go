//go:build !linux

package proxy

import "syscall"

// peekReadable is not used: rawConnOf finds no socket, so idle connections to
// Cells are not peeked at and websocket pumps wait inside their reads.
func peekReadable(uintptr) bool { return true }

func rawConnOf(syscall.Conn) syscall.RawConn { return nil }
