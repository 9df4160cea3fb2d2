package proxy

import "syscall"

// parkRead is the function a pump hands to syscall.RawConn.Read to wait
// until its socket has something to read (see pump.next). It peeks, so
// that bytes that arrived before the wait began are not waited for, and
// reports true (stop waiting) for anything a read would not block on:
// a byte, the end of the stream, an error.
func parkRead(fd uintptr) bool {
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
