package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
)

// TestUndeclaredForbiddenTrailer: trailers Cells sends without declaring
// them (no Trailer field) reach the client under their own names, except
// those that may not be trailers (RFC 9110, section 6.5.1), such as
// Content-Type or Content-Length: a lenient client could take one for the
// response's own. TestFrontForbiddenTrailer checks the declared ones; here
// both the direct path (a GET) and ReverseProxy's (an upload), to an
// HTTP/1.1 client, whose net/http server passes such a trailer on as the
// front did.
func TestUndeclaredForbiddenTrailer(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(_ int64, _ *http.Request, w *bufio.Writer) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"+
			"2\r\nok\r\n0\r\nContent-Type: evil/x\r\nContent-Length: 99\r\nX-Sum: 1\r\n\r\n")
		return true
	})
	tp := rawProxy(t, up)
	upload := strings.Repeat("u", 64<<10)
	for _, tc := range []struct{ name, req string }{
		{"direct", "GET /t HTTP/1.1\r\nHost: cells.example\r\nConnection: close\r\n\r\n"},
		{"upload", "PUT /t HTTP/1.1\r\nHost: cells.example\r\nConnection: close\r\nContent-Length: 65536\r\n\r\n" + upload},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
			defer conn.Close()
			go io.WriteString(conn, tc.req)
			raw, err := io.ReadAll(conn)
			if err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("reading the response: %v", err)
			}
			_, rest, ok := bytes.Cut(raw, []byte("\r\n0\r\n"))
			if !ok {
				t.Fatalf("no last chunk in the response %q", raw)
			}
			if bytes.Contains(rest, []byte("evil")) || bytes.Contains(rest, []byte("Content-Length")) {
				t.Errorf("a forbidden trailer reached the client: %q", rest)
			}
			if !bytes.Contains(rest, []byte("X-Sum: 1\r\n")) {
				t.Errorf("trailer section %q, want X-Sum: 1 in it", rest)
			}
		})
	}
	// HTTP/2: net/http's server drops such a trailer itself.
	res, body := getBody(t, tp.client(true), "GET", tp.URL+"/t")
	if body != "ok" || res.Trailer.Get("X-Sum") != "1" || res.Trailer.Get("Content-Type") != "" || res.Trailer.Get("Content-Length") != "" {
		t.Errorf("HTTP/2: body %q, trailers %v, want \"ok\" and X-Sum: 1 alone", body, res.Trailer)
	}
}
