package proxy

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// stalledUpload opens a connection to the redirect port and sends the head
// of a POST and 3 bytes of its 1000-byte body, then nothing: a client that
// stalled, or one that holds connections open on port 80.
func stalledUpload(t *testing.T, tp *testProxy) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", tp.RedirectAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: cells.example.com\r\nContent-Length: 1000\r\n\r\nabc"); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestOpsReviewRedirectStalledBody: the redirect port never reads a body,
// but net/http discards up to 256 KiB of one before it answers, with no
// deadline. A client that sent a head and part of a body held its
// connection and a goroutine for good, and never got its 308: enough of
// them use up the descriptors the public port shares. The whole request
// must arrive within PROXY_READ_HEADER_TIMEOUT; then the client gets its
// 308 and the connection is closed.
func TestOpsReviewRedirectStalledBody(t *testing.T) {
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.ReadHeaderTimeout = time.Second
	tp := startProxy(t, cfg)
	c := stalledUpload(t, tp)
	// A bound for a loaded machine, far above the 1 s limit.
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	b, err := io.ReadAll(c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the redirect port still holds a stalled upload's connection after 30 s (read %q)", b)
	}
	if got := string(b); !strings.HasPrefix(got, "HTTP/1.1 308 ") || !strings.Contains(got, "\r\nLocation: https://cells.example.com/upload\r\n") {
		t.Errorf("answer to a stalled upload = %q, want its 308 to https", got)
	}
}

// TestOpsReviewShutdownRedirectStalledBody: a connection to the redirect
// port whose request body is still arriving is closed when the stop
// begins, as one whose head is still arriving: its answer would send the
// client to the public port, which no longer accepts. It held every stop
// until PROXY_SHUTDOWN_TIMEOUT passed.
func TestOpsReviewShutdownRedirectStalledBody(t *testing.T) {
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.ReadHeaderTimeout = time.Hour // the drain must not wait for it
	cfg.ShutdownTimeout = 3 * time.Second
	cfg.AccessLog = true
	tp := startProxy(t, cfg)
	c := stalledUpload(t, tp)
	// The access line is written by the handler, once the head is read:
	// the connection is the server's, past the head.
	waitFor(t, 30*time.Second, func() bool { return strings.Contains(tp.Log.String(), "proto=redirect") }, func() string {
		return "the stalled upload's head did not reach the redirect handler"
	})
	if err := tp.Shutdown(); err != nil {
		t.Errorf("Run: %v", err)
	}
	if strings.Contains(tp.Log.String(), "drain deadline passed") {
		t.Errorf("the drain waited until its deadline for a redirect-port upload that stalled:\n%s", tp.Log)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the stalled upload's connection is still open after the stop")
	}
}

// TestOpsReviewRedirectAsteriskTarget: a request-target of "*" with a
// method other than OPTIONS (which net/http answers itself) was redirected
// to https://cells.example.com*, which is no URL.
func TestOpsReviewRedirectAsteriskTarget(t *testing.T) {
	tp := startProxy(t, testConfig(newUpstream(t, upPlain, &recorder{})))
	res := rawPlain(t, tp, "GET * HTTP/1.1\r\nHost: cells.example.com\r\n\r\n")
	if got, want := res.Header.Get("Location"), "https://cells.example.com/"; res.StatusCode != http.StatusMovedPermanently || got != want {
		t.Errorf("GET * on the redirect port: %s, Location %q; want 301 to %q", res.Status, got, want)
	}
}

// TestOpsReviewPathTrailingNewline: a path or URL that ends in a line
// break (a Kubernetes secret or a YAML block keeps one) is refused with a
// line that names the variable and says what to remove; it said "a space
// or tab", which the operator then looked for in vain.
func TestOpsReviewPathTrailingNewline(t *testing.T) {
	setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080\n"})
	_, err := Load()
	if err == nil {
		t.Fatal("Load with CELLS_UPSTREAM ending in a line break: no error")
	}
	for l := range strings.SplitSeq(err.Error(), "\n") {
		if !strings.HasPrefix(l, "CELLS_UPSTREAM ") {
			t.Errorf("line %q does not begin with the variable", l)
		}
		if strings.Contains(l, `\n"`) && !strings.Contains(l, "line break") {
			t.Errorf("line %q does not say that a line break is what to remove", l)
		}
	}
}

// TestOpsReviewRedirectHostForms: with PROXY_SERVER_NAMES, Host values
// that only look like a known name are refused on the redirect port, and a
// known name written with a trailing dot goes to the name without it; a
// Host that net/http refuses never reaches the redirect.
func TestOpsReviewRedirectHostForms(t *testing.T) {
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.ServerNames = []string{"cells.example.com", "2001:db8::1"}
	tp := startProxy(t, cfg)
	for _, tc := range []struct {
		host   string
		status int
		loc    string
	}{
		{"cells.example.com:443:evil.example", http.StatusNotFound, ""},
		{"cells.example.com:evil", http.StatusNotFound, ""},
		{"[cells.example.com]", http.StatusNotFound, ""},
		{"2001:db8::1", http.StatusNotFound, ""}, // unbracketed: no client writes it
		{"[2001:DB8:0::1]:80", http.StatusMovedPermanently, "https://[2001:DB8:0::1]/x"},
		{"cells.example.com.", http.StatusMovedPermanently, "https://cells.example.com/x"},
		{"cells.example.com@evil.example", http.StatusBadRequest, ""},
		{"evil.example/cells.example.com", http.StatusBadRequest, ""},
	} {
		res := rawPlain(t, tp, "GET /x HTTP/1.1\r\nHost: "+tc.host+"\r\n\r\n")
		if got := res.Header.Get("Location"); res.StatusCode != tc.status || got != tc.loc {
			t.Errorf("Host %q: %s, Location %q; want %d, %q", tc.host, res.Status, got, tc.status, tc.loc)
		}
	}
}
