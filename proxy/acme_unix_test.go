//go:build unix

package proxy

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestACMEChallengeOpenedOnce: a token's name is opened once and what was
// opened is served or refused, so that nothing swapped in between a look
// and an open gets through. The swap itself cannot be timed from a test;
// what the single open must do can: a named pipe with no writer, which
// os.Open waits on forever, is a 404 at once, as are a link (not
// followed), a directory and a file over 64 KiB, each with a warning
// naming what it is; a file of 64 KiB is served whole.
func TestACMEChallengeOpenedOnce(t *testing.T) {
	t.Parallel()
	webroot := t.TempDir()
	dir := filepath.Join(webroot, ".well-known", "acme-challenge")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(t.TempDir(), "outside")
	if err := os.WriteFile(outside, []byte("outside the webroot"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}
	full := strings.Repeat("k", acmeMaxFile)
	if err := os.WriteFile(filepath.Join(dir, "full"), []byte(full), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "large"), []byte(full+"k"), 0o644); err != nil {
		t.Fatal(err)
	}

	cfg := testConfig(newUpstream(t, upTLS, http.NotFoundHandler()))
	cfg.ACMEWebroot = webroot
	tp := startProxy(t, cfg)
	// The timeout only turns a handler stuck on the pipe into a failure
	// instead of a hung test; nothing is asserted about how long it took.
	client := &http.Client{Transport: &http.Transport{}, Timeout: time.Minute}
	defer client.CloseIdleConnections()
	get := func(token string) (int, string) {
		t.Helper()
		res, err := client.Get("http://" + tp.RedirectAddr().String() + acmePrefix + token)
		if err != nil {
			t.Fatalf("GET %s: %v", token, err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	if status, body := get("full"); status != http.StatusOK || body != full {
		t.Errorf("GET a token of 64 KiB: %d, %d bytes, want 200 and the %d bytes", status, len(body), len(full))
	}
	for _, tc := range []struct{ token, kind string }{
		{"fifo", "a named pipe"},
		{"link", "a symbolic link"},
		{"adir", "a directory"},
		{"large", "more than 64 KiB"},
	} {
		if status, body := get(tc.token); status != http.StatusNotFound || strings.Contains(body, "outside") {
			t.Errorf("GET %s: %d %q, want 404", tc.token, status, body)
		}
		warned := false
		for l := range strings.SplitSeq(tp.Log.String(), "\n") {
			if strings.Contains(l, "level=WARN") && strings.Contains(l, "cannot serve an ACME challenge") &&
				strings.Contains(l, "path="+acmePrefix+tc.token+" ") && strings.Contains(l, tc.kind) {
				warned = true
			}
		}
		if !warned {
			t.Errorf("GET %s: no warning naming %q in the log:\n%s", tc.token, tc.kind, tp.Log)
		}
	}
}

// TestACMEWebrootSearchable: the start check asks of the webroot what
// serving a challenge needs, search (x) permission on it and on the
// directories certbot makes in it, not read (r). As root, which searches
// any directory, it is skipped: TestACMEWebrootSearchOnly runs the binary
// as the image's user instead.
func TestACMEWebrootSearchable(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root searches any directory")
	}
	// mk is a webroot whose directories, from the top down to
	// .well-known/acme-challenge, have modes.
	mk := func(modes ...os.FileMode) string {
		root := t.TempDir()
		dirs := []string{root, filepath.Join(root, ".well-known"), filepath.Join(root, ".well-known", "acme-challenge")}[:len(modes)]
		if err := os.MkdirAll(dirs[len(dirs)-1], 0o755); err != nil {
			t.Fatal(err)
		}
		// Deepest first, and back for the clean-up.
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Chmod(dirs[i], modes[i]); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Chmod(dirs[i], 0o755) })
		}
		return root
	}
	for _, tc := range []struct {
		name  string
		dir   string
		taken bool
	}{
		{"search, no read, before certbot's first run", mk(0o111), true},
		{"search, no read, with certbot's directories", mk(0o111, 0o111, 0o111), true},
		{"read, no search", mk(0o644), false},
		{"a challenge directory without search", mk(0o755, 0o755, 0o644), false},
	} {
		err := checkACMEWebroot(tc.dir)
		if tc.taken && err != nil {
			t.Errorf("%s: %v, want it taken", tc.name, err)
		}
		if !tc.taken && (err == nil || !strings.HasPrefix(err.Error(), "PROXY_ACME_WEBROOT must name a directory") ||
			!strings.Contains(err.Error(), "uid "+strconv.Itoa(os.Getuid()))) {
			t.Errorf("%s: %v, want it refused, naming the variable and uid %d", tc.name, err, os.Getuid())
		}
	}
}
