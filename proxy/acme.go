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

// checkACMEWebroot reports whether dir is a directory cells-proxy can read.
func checkACMEWebroot(dir string) error {
	if dir == "" {
		return nil
	}
	f, err := os.Open(dir)
	if err == nil {
		var fi fs.FileInfo
		if fi, err = f.Stat(); err == nil && !fi.IsDir() {
			err = errors.New("not a directory")
		}
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("PROXY_ACME_WEBROOT must name a directory cells-proxy can read, the one certbot --webroot -w writes to: %w%s", err, readableBy(err))
	}
	return nil
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
func (s *Server) serveChallenge(w http.ResponseWriter, r *http.Request, token string) int {
	name := filepath.Join(s.cfg.ACMEWebroot, filepath.FromSlash(acmePrefix), token)
	fi, err := os.Lstat(name)
	if err == nil && (!fi.Mode().IsRegular() || fi.Size() > acmeMaxFile) {
		err = errors.New("not a regular file of at most 64 KiB")
	}
	var f *os.File
	if err == nil {
		if f, err = os.Open(name); err == nil {
			defer f.Close()
		}
	}
	if err != nil {
		// A token certbot has not written (or has cleaned up) is the
		// ACME server's 404, as is one too long for a file name (acmeToken
		// takes 256 bytes, NAME_MAX is 255): anyone may ask for either.
		// One the proxy may not read fails the renewal without a word in
		// certbot's log: say it here.
		if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENAMETOOLONG) {
			s.log.Warn("PROXY_ACME_WEBROOT: cannot serve an ACME challenge, and its renewal will fail: cells-proxy's user must be able to read the files certbot writes there", "path", r.URL.Path, "err", err)
		}
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
