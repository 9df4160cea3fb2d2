package proxy

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestACMEChallenge: with PROXY_ACME_WEBROOT the redirect port serves what
// certbot --webroot wrote for an HTTP-01 challenge, on any Host, and
// nothing else from the directory; every other request is redirected as
// before, and Cells is never contacted.
func TestACMEChallenge(t *testing.T) {
	t.Parallel()
	webroot := t.TempDir()
	dir := filepath.Join(webroot, ".well-known", "acme-challenge")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	const token, keyAuth = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0", "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
	write := func(name, content string) {
		if err := os.WriteFile(name, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(dir, token), keyAuth)
	write(filepath.Join(webroot, "secret"), "not for the ACME server")
	outside := filepath.Join(t.TempDir(), "outside")
	write(outside, "outside the webroot")
	for name, target := range map[string]string{"up": "../../secret", "out": outside} {
		if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}

	rec := &recorder{}
	cfg := testConfig(newUpstream(t, upTLS, rec))
	cfg.ServerNames = []string{"cells.example.com"}
	cfg.ACMEWebroot = webroot
	tp := startProxy(t, cfg)
	// An ACME server's GET: a plain net/http client that does not follow
	// the redirect.
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(method, host, target string) (*http.Response, string) {
		t.Helper()
		req, err := http.NewRequest(method, "http://"+tp.RedirectAddr().String()+target, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		res, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res, string(b)
	}
	challenge := "/.well-known/acme-challenge/"
	for _, host := range []string{"cells.example.com", "new.example.com"} {
		res, body := get("GET", host, challenge+token)
		if res.StatusCode != http.StatusOK || body != keyAuth || res.ContentLength != int64(len(keyAuth)) {
			t.Errorf("GET the token on %s: %d %q (length %d), want 200 %q", host, res.StatusCode, body, res.ContentLength, keyAuth)
		}
	}
	if res, body := get("HEAD", "cells.example.com", challenge+token); res.StatusCode != http.StatusOK || body != "" || res.ContentLength != int64(len(keyAuth)) {
		t.Errorf("HEAD the token: %d %q (length %d), want 200, no body, length %d", res.StatusCode, body, res.ContentLength, len(keyAuth))
	}
	for _, tc := range []struct {
		name, method, target string
		status               int
	}{
		{"a token not written", "GET", challenge + "NoSuchToken", http.StatusNotFound},
		{"a symbolic link up the webroot", "GET", challenge + "up", http.StatusNotFound},
		{"a symbolic link out of it", "GET", challenge + "out", http.StatusNotFound},
		{"a directory", "GET", challenge + "adir", http.StatusNotFound},
		{"dot segments", "GET", challenge + "../../secret", http.StatusMovedPermanently},
		{"encoded dot segments", "GET", challenge + "%2e%2e%2f%2e%2e%2fsecret", http.StatusMovedPermanently},
		{"the directory itself", "GET", challenge, http.StatusMovedPermanently},
		{"a deeper path", "GET", challenge + token + "/x", http.StatusMovedPermanently},
		{"another method", "POST", challenge + token, http.StatusPermanentRedirect},
		{"another path", "GET", "/secret", http.StatusMovedPermanently},
	} {
		res, body := get(tc.method, "cells.example.com", tc.target)
		if res.StatusCode != tc.status || strings.Contains(body, "webroot") || strings.Contains(body, "ACME") || strings.Contains(body, keyAuth) {
			t.Errorf("%s: %s %s = %d %q, want %d and no file", tc.name, tc.method, tc.target, res.StatusCode, body, tc.status)
		}
	}
	if n := rec.count(); n != 0 {
		t.Errorf("upstream saw %d requests, want 0", n)
	}
	// A link is not followed, and the operator is told why the renewal
	// failed; a token not there is the ACME server's business.
	if l := tp.Log.String(); !strings.Contains(l, "cannot serve an ACME challenge") || strings.Contains(l, "NoSuchToken") {
		t.Errorf("log, want a warning for the links and none for the missing token:\n%s", l)
	}
}

// TestACMEWebrootChecked: a PROXY_ACME_WEBROOT that is not a directory
// stops the start with the others' lines, not the first renewal.
func TestACMEWebrootChecked(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{filepath.Join(t.TempDir(), "missing"), file} {
		cfg := testConfig(nil)
		cfg.Upstream = &url.URL{Scheme: "http", Host: "127.0.0.1:9"}
		cfg.ACMEWebroot = dir
		_, err := New(cfg, slog.New(slog.DiscardHandler))
		var fe *FileError
		if !errors.As(err, &fe) || !strings.HasPrefix(err.Error(), "PROXY_ACME_WEBROOT must name a directory") {
			t.Errorf("PROXY_ACME_WEBROOT=%s: New = %v, want a FileError naming the variable", dir, err)
		}
	}
	setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_HTTP_ADDR": "off", "PROXY_ACME_WEBROOT": t.TempDir()})
	if _, err := Load(); err == nil || !strings.HasPrefix(err.Error(), "PROXY_ACME_WEBROOT is served on the plain HTTP port") {
		t.Errorf("PROXY_ACME_WEBROOT with PROXY_HTTP_ADDR=off: Load = %v, want the line saying it needs that port", err)
	}
}
