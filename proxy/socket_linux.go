package proxy

import "syscall"

// peekReadable peeks at a socket without waiting and reports whether a read
// would not block: a byte, the end of the stream, an error. upConn.quiet
// uses it on an idle connection to Cells.
func peekReadable(fd uintptr) bool {
	var b [1]byte
	_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	return err != syscall.EAGAIN
}

func rawConnOf(c syscall.Conn) syscall.RawConn {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}
