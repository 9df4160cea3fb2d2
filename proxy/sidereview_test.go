package proxy

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestSideReviewACMELongToken: a token of 256 characters, which acmeToken
// takes, is one byte longer than a file name may be (NAME_MAX): no file
// can hold it, so it is the ACME server's 404 like any token not written,
// not a warning that the renewal will fail, which anyone on port 80 could
// write into the log once a request.
func TestSideReviewACMELongToken(t *testing.T) {
	t.Parallel()
	webroot := t.TempDir()
	if err := os.MkdirAll(filepath.Join(webroot, ".well-known", "acme-challenge"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(newUpstream(t, upTLS, http.NotFoundHandler()))
	cfg.ACMEWebroot = webroot
	tp := startProxy(t, cfg)
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	token := strings.Repeat("A", 256)
	res, err := client.Get("http://" + tp.RedirectAddr().String() + acmePrefix + token)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if got, want := res.StatusCode, http.StatusNotFound; got != want {
		t.Errorf("GET a 256-character token: status %d, want %d", got, want)
	}
	if l := tp.Log.String(); strings.Contains(l, "cannot serve an ACME challenge") {
		t.Errorf("log, want no warning for a token no file can be named:\n%s", l)
	}
}
