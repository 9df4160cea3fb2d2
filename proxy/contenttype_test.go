package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// TestUntypedAnswer: an answer from Cells without Content-Type reaches
// the client without one, on every path, and a typed one with its type
// unchanged. net/http's servers (HTTP/1.1 after a hand-over, HTTP/2) sniff
// a type for a body written without one, and the HTTP/1.1 front did as
// they do: the client got "text/html; charset=utf-8" for bytes Cells had
// not typed, even with X-Content-Type-Options: nosniff, which asks that
// no one guess. RFC 9110, section 8.3 leaves the guess to the recipient;
// nginx, HAProxy and Envoy add no type. The upstream writes raw bytes, so
// that no Go server on Cells' side adds one either.
func TestUntypedAnswer(t *testing.T) {
	t.Parallel()
	const page = "<html><script>alert(1)</script>"
	answers := []struct {
		path, head string
		want       []string // the client's Content-Type values; nil: none
	}{
		{"/length", fmt.Sprintf("Content-Length: %d\r\n", len(page)), nil},
		{"/chunked", "Transfer-Encoding: chunked\r\n", nil},
		{"/nosniff", fmt.Sprintf("X-Content-Type-Options: nosniff\r\nContent-Length: %d\r\n", len(page)), nil},
		{"/typed", fmt.Sprintf("Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n", len(page)), []string{"text/plain; charset=utf-8"}},
		// A field with an empty value is a type too, Cells' to give:
		// it goes through as it came, and nothing is sniffed for it.
		{"/empty", fmt.Sprintf("Content-Type: \r\nContent-Length: %d\r\n", len(page)), []string{""}},
	}
	up := newRawUpstream(t, func(_ int64, req *http.Request, w *bufio.Writer) bool {
		for _, a := range answers {
			if a.path != req.URL.Path {
				continue
			}
			io.WriteString(w, "HTTP/1.1 200 OK\r\n"+a.head+"\r\n")
			if strings.Contains(a.head, "chunked") {
				fmt.Fprintf(w, "%x\r\n%s\r\n0\r\n\r\n", len(page), page)
			} else {
				io.WriteString(w, page)
			}
			return true
		}
		io.WriteString(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
		return true
	})
	tp := rawProxy(t, up)
	front := frontOf(t, tp)

	upload := strings.Repeat("u", 4*maxSyncBody) // too large for the direct path: ReverseProxy's
	raw := func(head string) func(t *testing.T, path string) (http.Header, []byte) {
		return func(t *testing.T, path string) (http.Header, []byte) {
			res, body := rawH1(t, tp, strings.Replace(head, "PATH", path, 1))
			return res.Header, body
		}
	}
	viaH2 := func(method, body string) func(t *testing.T, path string) (http.Header, []byte) {
		return func(t *testing.T, path string) (http.Header, []byte) {
			req, err := http.NewRequest(method, tp.URL+path, strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			res, err := tp.H2.Do(req)
			if err != nil {
				t.Fatalf("%s %s: %v", method, path, err)
			}
			defer res.Body.Close()
			if res.ProtoMajor != 2 {
				t.Fatalf("%s %s: got %s, want HTTP/2", method, path, res.Proto)
			}
			got, err := io.ReadAll(res.Body)
			if err != nil {
				t.Fatalf("%s %s: body: %v", method, path, err)
			}
			return res.Header, got
		}
	}
	routes := []struct {
		name     string
		handoffs int64 // connections the HTTP/1.1 front hands to net/http
		send     func(t *testing.T, path string) (http.Header, []byte)
	}{
		// The front serves a small GET itself, on the direct path.
		{"h1 front GET", 0, raw("GET PATH HTTP/1.1\r\nHost: cells.example\r\n\r\n")},
		// A head larger than the front reads: net/http's HTTP/1 server,
		// still the direct path.
		{"h1 handed-over GET", 1, raw("GET PATH HTTP/1.1\r\nHost: cells.example\r\nX-Pad: " + strings.Repeat("p", h1HeadMax) + "\r\n\r\n")},
		// An upload to stream: net/http's HTTP/1 server, ReverseProxy.
		{"h1 POST upload", 1, raw(fmt.Sprintf("POST PATH HTTP/1.1\r\nHost: cells.example\r\nContent-Length: %d\r\n\r\n%s", len(upload), upload))},
		// A websocket handshake Cells refuses: net/http's HTTP/1 server,
		// Cells' answer relayed by the websocket path.
		{"h1 websocket refused", 1, raw("GET PATH HTTP/1.1\r\nHost: cells.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")},
		{"h2 GET", 0, viaH2("GET", "")},
		{"h2 POST upload", 0, viaH2("POST", upload)},
	}
	for _, r := range routes {
		for _, a := range answers {
			t.Run(r.name+a.path, func(t *testing.T) {
				before := front.handoffs.Load()
				h, body := r.send(t, a.path)
				if got := front.handoffs.Load() - before; got != r.handoffs {
					t.Fatalf("%d hand-overs to net/http's server, want %d: not the path under test", got, r.handoffs)
				}
				if got := h["Content-Type"]; !reflect.DeepEqual(got, a.want) {
					t.Errorf("Content-Type at the client = %q, want %q (Cells sent %q)", got, a.want, a.head)
				}
				if !bytes.Equal(body, []byte(page)) {
					t.Errorf("body at the client = %q, want %q", body, page)
				}
				if a.path == "/nosniff" {
					if got, want := h.Get("X-Content-Type-Options"), "nosniff"; got != want {
						t.Errorf("X-Content-Type-Options = %q, want %q", got, want)
					}
				}
			})
		}
	}
}
