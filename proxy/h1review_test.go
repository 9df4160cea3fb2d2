package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestFrontWatchByteStartsHandedOverUpload: while the front serves a slow
// GET, its client watch reads the connection and takes the first byte of a
// pipelined upload with Expect: 100-continue, which the front hands to
// net/http's server. The byte the watch took must be replayed in its place:
// net/http must read the upload's head whole, answer 100 Continue, and Cells
// get the body byte for byte.
func TestFrontWatchByteStartsHandedOverUpload(t *testing.T) {
	t.Parallel()
	rec := &wireRecorder{Respond: func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			// Past clientWatchDelay: the watch is reading the client
			// when the next request's first byte comes.
			time.Sleep(4 * clientWatchDelay)
		}
		io.WriteString(w, "ok")
	}}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	front := frontOf(t, tp)

	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	br := bufio.NewReader(conn)
	if _, err := io.WriteString(conn, "GET /slow HTTP/1.1\r\nHost: cells.example\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// Not an assertion: only the moment the watch is likely reading.
	time.Sleep(2 * clientWatchDelay)
	body := bytes.Repeat([]byte("0123456789abcdef"), 2<<10) // 32 KiB, past maxSyncBody
	head := "PUT /upload HTTP/1.1\r\nHost: cells.example\r\nExpect: 100-continue\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n"
	if _, err := io.WriteString(conn, head[:1]); err != nil {
		t.Fatal(err)
	}
	if res, got := readResponse(t, br, http.MethodGet); res.StatusCode != http.StatusOK || got != "ok" {
		t.Fatalf("answer to GET /slow = %d %q, want 200 \"ok\"", res.StatusCode, got)
	}
	if _, err := io.WriteString(conn, head[1:]); err != nil {
		t.Fatal(err)
	}
	res, err := http.ReadResponse(br, &http.Request{Method: http.MethodPut})
	if err != nil {
		t.Fatalf("reading the answer to the upload's head: %v", err)
	}
	if got, want := res.StatusCode, http.StatusContinue; got != want {
		t.Fatalf("answer to the upload's head = %d, want %d", got, want)
	}
	if _, err := conn.Write(body); err != nil {
		t.Fatal(err)
	}
	// A second 100 may come: net/http's server sends one when the body
	// is first read, and ReverseProxy passes on Cells' own, racing it
	// (a client must take any number of 1xx, RFC 9110, section 15.2).
	for {
		res, got := readResponse(t, br, http.MethodPut)
		if res.StatusCode == http.StatusContinue {
			continue
		}
		if res.StatusCode != http.StatusOK || got != "ok" {
			t.Fatalf("answer to PUT /upload = %d %q, want 200 \"ok\"", res.StatusCode, got)
		}
		break
	}
	if n := front.handoffs.Load(); n != 1 {
		t.Errorf("%d connections handed over, want 1", n)
	}
	quiesce(t, tp, up)
	seen := rec.all()
	if len(seen) != 2 {
		t.Fatalf("upstream saw %d requests, want 2", len(seen))
	}
	w := seen[1]
	if w.Method != http.MethodPut || w.RequestURI != "/upload" {
		t.Fatalf("upstream's second request = %s %s, want PUT /upload", w.Method, w.RequestURI)
	}
	if w.BodyErr != nil || !bytes.Equal(w.Body, body) {
		t.Errorf("upstream got a body of %d bytes (err %v), want the %d sent", len(w.Body), w.BodyErr, len(body))
	}
}

// TestH1TransferEncodingListedTwice: "chunked, chunked" on one line (the
// two-line form is in TestH1Smuggling) is refused before Cells: a recipient
// that dechunked once would read the inner chunked framing as the body.
func TestH1TransferEncodingListedTwice(t *testing.T) {
	t.Parallel()
	for _, te := range []string{"chunked, chunked", "chunked,chunked", "identity", "chunked, identity, chunked"} {
		t.Run(te, func(t *testing.T) {
			t.Parallel()
			rec := &wireRecorder{}
			up := newUpstream(t, upTLS, rec)
			tp := startProxy(t, testConfig(up))
			raw := "POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: " + te + "\r\n\r\n" +
				oneChunk(oneChunk("x")+"0\r\n\r\n") + "0\r\n\r\n" + smuggled
			got := rawExchange(t, tp, raw)
			quiesce(t, tp, up)
			if len(got.Responses) != 1 {
				t.Fatalf("client got %d responses %v, want exactly 1", len(got.Responses), got.statuses())
			}
			if s := got.Responses[0].StatusCode; s != http.StatusNotImplemented && s != http.StatusBadRequest {
				t.Errorf("status = %d, want 501 or 400", s)
			}
			if !got.Closed {
				t.Errorf("connection still open after the answer (%v), want it closed", got.Err)
			}
			for _, w := range rec.all() {
				t.Errorf("upstream saw %s %s (body %q), want nothing", w.Method, w.RequestURI, w.Body)
			}
		})
	}
}

// TestFrontForbiddenTrailer: a Cells response announcing, and sending, a
// trailer field that may not be one (Content-Type, RFC 9110, section 6.5.1)
// reaches an HTTP/1.1 client as net/http's server writes it: the announced
// name is not declared (httpguts.ValidTrailerHeader), so the field is not
// sent after the body, where a lenient client could take it for the
// response's own. The upstream is raw: Go's server would not send it.
func TestFrontForbiddenTrailer(t *testing.T) {
	t.Parallel()
	up := newAnsweringUpstream(t, func(*http.Request) string {
		return "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTrailer: Content-Type, X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n" +
			"2\r\nok\r\n0\r\nContent-Type: evil/x\r\nX-Sum: 1\r\n\r\n"
	})
	tp := up.proxy(t)

	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	if _, err := io.WriteString(conn, "GET /t HTTP/1.1\r\nHost: cells.example\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	_, rest, ok := bytes.Cut(raw, []byte("\r\n0\r\n"))
	if !ok {
		t.Fatalf("no last chunk in the response %q", raw)
	}
	if bytes.Contains(rest, []byte("evil")) {
		t.Errorf("a Content-Type trailer reached the client: %q", rest)
	}
	if !bytes.Contains(rest, []byte("X-Sum: 1\r\n")) {
		t.Errorf("trailer section %q, want X-Sum: 1 in it", rest)
	}
}

// TestHopByHopCannotStripProxyFields: a client naming the proxy's own
// fields (and Content-Length, Host) in Connection, as if hop-by-hop, must
// not take them off the request Cells gets: X-Forwarded-For, X-Real-IP and
// X-Forwarded-Proto stay the proxy's, the body keeps its framing, Host
// stays. Both the front's direct path (small body) and net/http's (an
// upload past maxSyncBody) are checked.
func TestHopByHopCannotStripProxyFields(t *testing.T) {
	t.Parallel()
	for _, size := range []int{5, 32 << 10} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			t.Parallel()
			rec := &wireRecorder{}
			up := newUpstream(t, upTLS, rec)
			tp := startProxy(t, testConfig(up))
			body := strings.Repeat("h", size)
			raw := "POST /a HTTP/1.1\r\nHost: cells.example\r\n" +
				"Connection: X-Forwarded-For, X-Real-IP, X-Forwarded-Proto, Content-Length, Host\r\n" +
				"X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n" +
				"Content-Length: " + strconv.Itoa(size) + "\r\n\r\n" + body +
				"GET /b HTTP/1.1\r\nHost: cells.example\r\nConnection: close\r\n\r\n"
			got := rawExchange(t, tp, raw)
			quiesce(t, tp, up)
			if s := got.statuses(); len(s) != 2 || s[0] != 200 || s[1] != 200 {
				t.Fatalf("client got %v, want [200 200]", s)
			}
			seen := rec.all()
			if len(seen) != 2 {
				t.Fatalf("upstream saw %d requests, want 2", len(seen))
			}
			w := seen[0]
			if w.BodyErr != nil || string(w.Body) != body {
				t.Errorf("upstream body: %d bytes, err %v; want %d", len(w.Body), w.BodyErr, size)
			}
			if got, want := w.Host, "cells.example"; got != want {
				t.Errorf("upstream Host = %q, want %q", got, want)
			}
			for k, want := range map[string]string{"X-Forwarded-For": "127.0.0.1", "X-Real-Ip": "127.0.0.1", "X-Forwarded-Proto": "https"} {
				if got := w.Header.Values(k); len(got) != 1 || got[0] != want {
					t.Errorf("upstream %s = %q, want %q", k, got, want)
				}
			}
			if got, want := seen[1].RequestURI, "/b"; got != want {
				t.Errorf("upstream's second request = %q, want %q", got, want)
			}
		})
	}
}

// TestExpectRefusedBodyNotARequest: Cells refuses an Expect: 100-continue
// upload before its body (a bad S3 signature); the client sends the body
// anyway, at once or after the refusal, and the body holds what looks like
// a request. The body's bytes must never be read as a request: the client
// gets the 403 alone and the connection closes, and Cells never sees the
// inner request.
func TestExpectRefusedBodyNotARequest(t *testing.T) {
	t.Parallel()
	for _, size := range []int{len(smuggled), 64 << 10} {
		for _, after := range []bool{false, true} {
			t.Run(fmt.Sprintf("%d/after=%v", size, after), func(t *testing.T) {
				t.Parallel()
				rec := &wireRecorder{Respond: func(w http.ResponseWriter, r *http.Request) {}}
				up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.URL.Path == "/io/b/k" {
						w.WriteHeader(http.StatusForbidden) // unread
						return
					}
					rec.ServeHTTP(w, r)
				}))
				tp := startProxy(t, testConfig(up))
				body := strings.Repeat(smuggled, size/len(smuggled))
				head := "PUT /io/b/k HTTP/1.1\r\nHost: cells.example\r\nExpect: 100-continue\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n"
				conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
				br := bufio.NewReader(conn)
				wrote := make(chan struct{})
				if after {
					io.WriteString(conn, head)
					res, got := readResponse(t, br, http.MethodPut)
					if res.StatusCode != http.StatusForbidden {
						t.Fatalf("answer to the head = %d %q, want 403", res.StatusCode, got)
					}
					go func() { defer close(wrote); io.WriteString(conn, body) }()
				} else {
					go func() { defer close(wrote); io.WriteString(conn, head+body) }()
					res, got := readResponse(t, br, http.MethodPut)
					if res.StatusCode != http.StatusForbidden {
						t.Fatalf("answer = %d %q, want 403", res.StatusCode, got)
					}
				}
				if res, err := http.ReadResponse(br, nil); err == nil {
					t.Errorf("a second response, %d, after the refused upload: its body was read as a request", res.StatusCode)
				}
				conn.Close()
				<-wrote
				quiesce(t, tp, up)
				for _, w := range rec.all() {
					t.Errorf("upstream saw %s %s from the refused upload's body", w.Method, w.RequestURI)
				}
			})
		}
	}
}
