package proxy

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// HTTP-01 renewals (RFC 8555 §8.3) need port 80, which cells-proxy holds
// for its redirect: certbot --standalone cannot bind it, and a redirect to
// https reaches Cells, which has no token to show. The classic nginx setup
// serves the challenge directory in its port-80 server
// (location /.well-known/acme-challenge/ { root ...; }); with
// PROXY_ACME_WEBROOT the redirect port does the same, and nothing else:
// a request for any other path is redirected as before.

// acmePrefix is where an ACME server asks for a token, and where certbot's
// --webroot writes it under the directory it is given.
const acmePrefix = "/.well-known/acme-challenge/"

// acmeMaxFile bounds what a challenge answer may be: a key authorization is
// a token, a dot and a thumbprint, about 90 bytes.
const acmeMaxFile = 64 << 10

// acmeNotRegular is the warning for a token's name that is there but is
// not what certbot writes.
const acmeNotRegular = "PROXY_ACME_WEBROOT: cannot serve an ACME challenge, and its renewal will fail: the token must be a regular file of at most 64 KiB, as certbot writes it"

// checkACMEWebroot reports whether dir is a directory cells-proxy can serve
// challenges from. Serving opens DIR/.well-known/acme-challenge/TOKEN by
// name, which takes search (x) permission on each directory on the way, not
// read (r): nothing is listed. So a webroot root owns with mode 0711
// serves and is taken, and one with 0644, which fails every challenge, is
// refused.
func checkACMEWebroot(dir string) error {
	if dir == "" {
		return nil
	}
	fi, err := os.Stat(dir)
	if err == nil && !fi.IsDir() {
		err = &fs.PathError{Op: "stat", Path: dir, Err: syscall.ENOTDIR}
	}
	if err == nil {
		// Looking a name up in a directory takes search permission on it:
		// the name, which no token can be (a token has no dot), is not
		// there, and neither may the directories be before certbot's
		// first run makes them. Only a refusal tells anything.
		_, err = os.Lstat(filepath.Join(dir, ".well-known", "acme-challenge", ".cells-proxy"))
		if !errors.Is(err, fs.ErrPermission) {
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("PROXY_ACME_WEBROOT must name a directory cells-proxy can open files in, the one certbot --webroot -w writes to: %w%s", err, searchableBy(err))
	}
	return nil
}

// searchableBy is the fix for a directory cells-proxy may not open files
// in, readableBy's counterpart for directories.
func searchableBy(err error) string {
	if !errors.Is(err, fs.ErrPermission) {
		return ""
	}
	return fmt.Sprintf(": let uid %d, which cells-proxy runs as, search it, the folders above it and .well-known/acme-challenge in it (the x permission, as in mode 755 or 711; reading them is not needed)", os.Getuid())
}

// acmeToken is the token of an HTTP-01 challenge request for path, and
// whether path is one. A token is base64url (RFC 8555 §8.1): nothing in it
// can leave the challenge directory.
func acmeToken(path string) (string, bool) {
	token, ok := strings.CutPrefix(path, acmePrefix)
	if !ok || token == "" || len(token) > 256 {
		return "", false
	}
	for i := 0; i < len(token); i++ {
		c := token[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return "", false
		}
	}
	return token, true
}

// serveChallenge answers an ACME server's GET for token from the webroot,
// or 404, and returns the status. Only a regular file is served: certbot
// writes one, and a symbolic link could lead anywhere. (os.OpenInRoot would
// follow links that stay inside the directory, for 32 KB of binary.)
//
// The name is opened once, without following a link or waiting for a
// writer (openChallenge), and what was opened is looked at and served:
// certbot's cleanup and the next challenge write the same names, and
// whoever can write the webroot could swap a link or a named pipe in
// between a look at the name and its opening, which would then follow the
// link or wait for the pipe's writer forever, holding the handler.
func (s *Server) serveChallenge(w http.ResponseWriter, r *http.Request, token string) int {
	name := filepath.Join(s.cfg.ACMEWebroot, filepath.FromSlash(acmePrefix), token)
	f, err := openChallenge(name)
	if err != nil {
		// A token certbot has not written (or has cleaned up) is the
		// ACME server's 404, as is one too long for a file name (acmeToken
		// takes 256 bytes, NAME_MAX is 255): anyone may ask for either.
		// One the proxy may not read fails the renewal without a word in
		// certbot's log: say it here. So does a symbolic link (ELOOP, as
		// O_NOFOLLOW reports it), put there by someone, not by certbot.
		switch {
		case errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENAMETOOLONG):
		case errors.Is(err, syscall.ELOOP):
			s.log.Warn(acmeNotRegular, "path", r.URL.Path, "err", errors.New("a symbolic link, which is not followed"))
		default:
			s.log.Warn("PROXY_ACME_WEBROOT: cannot serve an ACME challenge, and its renewal will fail: cells-proxy's user must be able to read the files certbot writes there", "path", r.URL.Path, "err", err)
		}
		http.NotFound(w, r)
		return http.StatusNotFound
	}
	defer f.Close()
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("a %s, not a regular file", fileKind(fi.Mode()))
	} else if err == nil && fi.Size() > acmeMaxFile {
		err = fmt.Errorf("%d bytes, more than 64 KiB", fi.Size())
	}
	if err != nil {
		// certbot writes a regular file under each token's name: a named
		// pipe, a directory or a large file there was put by someone
		// else who writes the webroot, as a link was, and the renewal
		// that asks for it fails. Like the link, it is named in a
		// warning; only a name that is not there is anyone's to ask for.
		s.log.Warn(acmeNotRegular, "path", r.URL.Path, "err", err)
		http.NotFound(w, r)
		return http.StatusNotFound
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(fi.Size(), 10))
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	io.Copy(w, io.LimitReader(f, fi.Size()))
	return http.StatusOK
}

// fileKind names what a token's name is when it is not a regular file.
func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return "special file"
}
