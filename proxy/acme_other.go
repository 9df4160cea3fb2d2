//go:build !unix

package proxy

import (
	"os"
	"syscall"
)

// openChallenge opens name for reading, where there is no O_NOFOLLOW
// (Windows: no named pipe lives in a directory there). The link a name
// may be is followed by the open, so the name is looked at after it: it
// must be what was opened, not a link to it, or the file is not served.
func openChallenge(name string) (*os.File, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	lfi, err := os.Lstat(name)
	if err == nil {
		var fi os.FileInfo
		if fi, err = f.Stat(); err == nil && !os.SameFile(lfi, fi) {
			err = &os.PathError{Op: "open", Path: name, Err: syscall.ELOOP}
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
