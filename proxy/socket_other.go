//go:build !linux

package proxy

import "syscall"

// parkRead is not used: rawConn finds no socket to park on, so pumps wait
// inside their reads, on larger stacks.
func parkRead(uintptr) bool { return true }

func rawConnOf(syscall.Conn) syscall.RawConn { return nil }
