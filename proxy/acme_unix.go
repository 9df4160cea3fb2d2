//go:build unix

package proxy

import (
	"os"
	"syscall"
)

// openChallenge opens name for reading as it is now: O_NOFOLLOW refuses a
// symbolic link (ELOOP), and O_NONBLOCK returns at once from opening a
// named pipe, which would otherwise wait for a writer. A regular file read
// with O_NONBLOCK reads as without it.
func openChallenge(name string) (*os.File, error) {
	return os.OpenFile(name, syscall.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
}
