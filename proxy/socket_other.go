//go:build !linux

package proxy

import "syscall"

// parkRead is not used: rawConnOf finds no socket, so idle connections to
// Cells are not peeked at and websocket pumps wait inside their reads.
func parkRead(uintptr) bool { return true }

func rawConnOf(syscall.Conn) syscall.RawConn { return nil }
