package proxy

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// frontUpstream answers by path, for the HTTP/1.1 front's tests.
func frontUpstream(t testing.TB, rec *recorder) *testUpstream {
	rec.Respond = func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/chunked":
			// No length: Cells streams it chunked.
			io.WriteString(w, "first,")
			w.(http.Flusher).Flush()
			io.WriteString(w, "second")
		case "/trailer":
			w.Header().Set("Trailer", "X-Checksum")
			io.WriteString(w, "body")
			w.Header().Set("X-Checksum", "abc")
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
		case "/count":
			// The body the recorder read (not rec.last: t may be a
			// fuzz target's F, not for handler goroutines).
			rec.mu.Lock()
			n := len(rec.reqs[len(rec.reqs)-1].Body)
			rec.mu.Unlock()
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, strconv.Itoa(n))
		default:
			w.Header().Set("Content-Length", "2")
			io.WriteString(w, "ok")
		}
	}
	return newUpstream(t, upTLS, rec)
}

func frontOf(t *testing.T, tp *testProxy) *h1Front {
	t.Helper()
	for range 100 {
		if f := tp.front.Load(); f != nil {
			return f
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("the proxy has no HTTP/1.1 front")
	return nil
}

// startFront starts a proxy for frontUpstream, which records into rec,
// and returns them with the proxy's HTTP/1.1 front.
func startFront(t *testing.T) (rec *recorder, tp *testProxy, front *h1Front) {
	t.Helper()
	rec = &recorder{}
	tp = startProxy(t, testConfig(frontUpstream(t, rec)))
	return rec, tp, frontOf(t, tp)
}

// readResponse reads one response and its body from br.
func readResponse(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	res, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading the response to %s: %v", method, err)
	}
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("reading the body of the response to %s: %v", method, err)
	}
	res.Body.Close()
	return res, string(body)
}

// TestFrontOneConnection sends, on one kept-alive HTTP/1.1 connection, the
// requests the front serves (pipelined too), then an upload it hands to
// net/http's server, then more requests: every answer is whole and in
// order, the framing is right for each kind of response, and Cells sees
// each request once with the proxy's forwarding fields.
func TestFrontOneConnection(t *testing.T) {
	rec, tp, front := startFront(t)

	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	br := bufio.NewReader(conn)
	send := func(s string) {
		t.Helper()
		if _, err := io.WriteString(conn, s); err != nil {
			t.Fatal(err)
		}
	}
	get := func(path string) string {
		return "GET " + path + " HTTP/1.1\r\nHost: cells.example\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
	}

	send(get("/small"))
	res, body := readResponse(t, br, "GET")
	if res.StatusCode != 200 || body != "ok" || res.ContentLength != 2 || res.Close {
		t.Fatalf("GET /small: %d %q length %d close %v", res.StatusCode, body, res.ContentLength, res.Close)
	}
	if res.Header.Get("Date") == "" {
		t.Error("no Date field")
	}
	if got := rec.last(t); got.Host != "cells.example" || got.Header.Get("X-Forwarded-For") != "127.0.0.1" {
		t.Errorf("Cells saw Host %q, X-Forwarded-For %q", got.Host, got.Header.Get("X-Forwarded-For"))
	}

	// Pipelined: both requests in one write, answered in order.
	send(get("/small") + "HEAD /small HTTP/1.1\r\nHost: cells.example\r\n\r\n")
	if res, body := readResponse(t, br, "GET"); res.StatusCode != 200 || body != "ok" {
		t.Fatalf("pipelined GET: %d %q", res.StatusCode, body)
	}
	if res, body := readResponse(t, br, "HEAD"); res.StatusCode != 200 || body != "" || res.ContentLength != 2 {
		t.Fatalf("pipelined HEAD: %d %q length %d", res.StatusCode, body, res.ContentLength)
	}

	send(get("/chunked"))
	res, body = readResponse(t, br, "GET")
	if body != "first,second" || len(res.TransferEncoding) != 1 || res.TransferEncoding[0] != "chunked" {
		t.Fatalf("GET /chunked: %q, transfer encoding %v", body, res.TransferEncoding)
	}

	send(get("/trailer"))
	res, body = readResponse(t, br, "GET")
	if body != "body" || res.Trailer.Get("X-Checksum") != "abc" {
		t.Fatalf("GET /trailer: %q, trailer %v", body, res.Trailer)
	}

	send(get("/empty"))
	res, body = readResponse(t, br, "GET")
	if res.StatusCode != http.StatusNoContent || body != "" || res.TransferEncoding != nil {
		t.Fatalf("GET /empty: %d %q %v", res.StatusCode, body, res.TransferEncoding)
	}

	small := strings.Repeat("s", 1000)
	send("POST /count HTTP/1.1\r\nHost: cells.example\r\nContent-Length: 1000\r\n\r\n" + small)
	if res, body := readResponse(t, br, "POST"); res.StatusCode != 200 || body != "1000" {
		t.Fatalf("small POST: %d %q", res.StatusCode, body)
	}
	if n := front.handoffs.Load(); n != 0 {
		t.Fatalf("%d connections handed to net/http before the upload, want 0", n)
	}

	// An upload too large for the direct path: net/http's server takes
	// the connection from its head on.
	big := strings.Repeat("b", 100<<10)
	send("PUT /count HTTP/1.1\r\nHost: cells.example\r\nContent-Length: " + strconv.Itoa(len(big)) + "\r\n\r\n" + big)
	if res, body := readResponse(t, br, "PUT"); res.StatusCode != 200 || body != strconv.Itoa(len(big)) {
		t.Fatalf("upload: %d %q", res.StatusCode, body)
	}
	if n := front.handoffs.Load(); n != 1 {
		t.Fatalf("%d connections handed to net/http, want 1", n)
	}
	send(get("/chunked"))
	if _, body := readResponse(t, br, "GET"); body != "first,second" {
		t.Fatalf("GET after the hand-over: %q", body)
	}
	if n := rec.count(); n != 9 {
		t.Errorf("Cells saw %d requests, want 9", n)
	}
}

// TestFrontHandsOver: requests the front does not serve reach net/http's
// server with every byte the client sent, and get its answer (the first
// response: 100 Continue to an Expect).
func TestFrontHandsOver(t *testing.T) {
	_, tp, front := startFront(t)

	bigHead := "GET /small HTTP/1.1\r\nHost: cells.example\r\nX-Big: " + strings.Repeat("x", h1HeadMax) + "\r\n\r\n"
	for _, tc := range []struct {
		name, req string
		status    int
	}{
		{"HTTP/1.0", "GET /small HTTP/1.0\r\nHost: cells.example\r\n\r\n", 200},
		{"no Host", "GET /small HTTP/1.1\r\n\r\n", 400},
		{"two Hosts", "GET /small HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
		{"bad field name", "GET /small HTTP/1.1\r\nHost: cells.example\r\nBad Name: x\r\n\r\n", 400},
		{"bare LF", "GET /small HTTP/1.1\nHost: cells.example\n\n", 200},
		{"empty line first", "\r\nGET /small HTTP/1.1\r\nHost: cells.example\r\n\r\n", 400},
		{"head above the front's buffer", bigHead, 200},
		{"absolute form", "GET https://cells.example/small HTTP/1.1\r\nHost: cells.example\r\n\r\n", 200},
		{"Expect", "POST /count HTTP/1.1\r\nHost: cells.example\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc", 100},
		{"chunked body", "POST /count HTTP/1.1\r\nHost: cells.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 200},
		{"malformed request line", "GET /small\r\nHost: cells.example\r\n\r\n", 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := front.handoffs.Load()
			conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
			res := rawResponse(t, conn, tc.req)
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != tc.status {
				t.Errorf("status %d (%q), want %d", res.StatusCode, body, tc.status)
			}
			if got := front.handoffs.Load() - before; got != 1 {
				t.Errorf("%d connections handed over, want 1", got)
			}
		})
	}
}

// TestFrontSlowHead: a head that arrives a few bytes at a time, and a
// request split between two writes, are read whole.
func TestFrontSlowHead(t *testing.T) {
	_, tp, front := startFront(t)

	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	br := bufio.NewReader(conn)
	req := "GET /small HTTP/1.1\r\nHost: cells.example\r\nUser-Agent: slow\r\n\r\n"
	for i := 0; i < len(req); i += 7 {
		io.WriteString(conn, req[i:min(i+7, len(req))])
		time.Sleep(2 * time.Millisecond)
	}
	if res, body := readResponse(t, br, "GET"); res.StatusCode != 200 || body != "ok" {
		t.Fatalf("slow head: %d %q", res.StatusCode, body)
	}
	// A body that follows its head later.
	io.WriteString(conn, "POST /count HTTP/1.1\r\nHost: cells.example\r\nContent-Length: 5\r\n\r\n")
	time.Sleep(20 * time.Millisecond)
	io.WriteString(conn, "hello")
	if res, body := readResponse(t, br, "POST"); res.StatusCode != 200 || body != "5" {
		t.Fatalf("late body: %d %q", res.StatusCode, body)
	}
	if n := front.handoffs.Load(); n != 0 {
		t.Errorf("%d connections handed over, want 0", n)
	}
}

// TestFrontReadHeaderTimeout: a head that stops half-way is dropped after
// PROXY_READ_HEADER_TIMEOUT, on the first request and on a later one.
func TestFrontReadHeaderTimeout(t *testing.T) {
	up := frontUpstream(t, &recorder{})
	cfg := testConfig(up)
	cfg.ReadHeaderTimeout = 300 * time.Millisecond
	tp := startProxy(t, cfg)

	for _, first := range []bool{true, false} {
		conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
		br := bufio.NewReader(conn)
		if !first {
			io.WriteString(conn, "GET /small HTTP/1.1\r\nHost: cells.example\r\n\r\n")
			if res, _ := readResponse(t, br, "GET"); res.StatusCode != 200 {
				t.Fatalf("status %d", res.StatusCode)
			}
		}
		io.WriteString(conn, "GET /small HTTP/1.1\r\nHost: cel")
		start := time.Now()
		if _, err := br.ReadByte(); err == nil {
			t.Fatalf("first=%v: an answer to half a head", first)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("first=%v: dropped after %v, want about 300ms", first, d)
		}
	}
}

// TestFrontConnectionClose: a client's Connection: close is answered with
// Connection: close, and the connection ends after the response.
func TestFrontConnectionClose(t *testing.T) {
	up := frontUpstream(t, &recorder{})
	tp := startProxy(t, testConfig(up))
	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	br := bufio.NewReader(conn)
	io.WriteString(conn, "GET /small HTTP/1.1\r\nHost: cells.example\r\nConnection: close\r\n\r\n")
	res, body := readResponse(t, br, "GET")
	if res.StatusCode != 200 || body != "ok" || !res.Close {
		t.Fatalf("%d %q close %v", res.StatusCode, body, res.Close)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after the response: %v, want EOF", err)
	}
}

// TestFrontShutdown: at shutdown a kept-alive connection between requests
// is closed, and a request in flight is answered in full, with
// Connection: close.
func TestFrontShutdown(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			entered <- struct{}{}
			<-release
		}
		io.WriteString(w, "done")
	}))
	tp := startProxy(t, testConfig(up))

	idle := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	idleR := bufio.NewReader(idle)
	io.WriteString(idle, "GET /small HTTP/1.1\r\nHost: cells.example\r\n\r\n")
	if res, _ := readResponse(t, idleR, "GET"); res.StatusCode != 200 {
		t.Fatalf("status %d", res.StatusCode)
	}

	busy := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	busyR := bufio.NewReader(busy)
	io.WriteString(busy, "GET /slow HTTP/1.1\r\nHost: cells.example\r\n\r\n")
	<-entered

	stopped := make(chan error, 1)
	go func() { stopped <- tp.Shutdown() }()
	if _, err := idleR.ReadByte(); err == nil {
		t.Error("the idle connection got bytes at shutdown, want it closed")
	}
	close(release)
	res, body := readResponse(t, busyR, "GET")
	if res.StatusCode != 200 || body != "done" || !res.Close {
		t.Errorf("in-flight request: %d %q close %v", res.StatusCode, body, res.Close)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// TestFrontConcurrent: many kept-alive connections at once, each with a
// run of small requests, some pipelined, some with bodies; run under -race
// it also checks the front's client watch against its request reader.
func TestFrontConcurrent(t *testing.T) {
	rec := &recorder{Respond: func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("wait") != "" {
			time.Sleep(2 * clientWatchDelay) // the client watch starts
		}
		io.WriteString(w, r.URL.RawQuery)
	}}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	front := frontOf(t, tp)

	var wg sync.WaitGroup
	for c := range 8 {
		wg.Go(func() {
			conn, err := tls.Dial("tcp", tp.Addr().String(), tp.TLSConfig("http/1.1"))
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(20 * time.Second))
			br := bufio.NewReader(conn)
			for i := range 20 {
				q := fmt.Sprintf("c=%d&i=%d", c, i)
				if i%5 == 0 {
					q += "&wait=1"
				}
				req := "GET /?" + q + " HTTP/1.1\r\nHost: cells.example\r\n\r\n"
				if i%3 == 0 {
					req = "POST /?" + q + " HTTP/1.1\r\nHost: cells.example\r\nContent-Length: 3\r\n\r\nabc"
				}
				if _, err := io.WriteString(conn, req); err != nil {
					t.Error(err)
					return
				}
				res, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Error(err)
					return
				}
				body, err := io.ReadAll(res.Body)
				if err != nil || string(body) != q {
					t.Errorf("answer %q (%v), want %q", body, err, q)
					return
				}
			}
		})
	}
	wg.Wait()
	if n := front.handoffs.Load(); n != 0 {
		t.Errorf("%d connections handed over, want 0", n)
	}
}

var _ net.Conn = (*replayConn)(nil)

// FuzzH1Head: headEnd finds the end of a head exactly (an empty line after
// CRLF lines only) and never past the bytes it was given; and
// http.ReadRequest, given a whole head, reads nothing past what the reader
// holds, whether it parses the head or not: the hand-over replays what the
// reader held before the parse.
func FuzzH1Head(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
	f.Add([]byte("GET /x?y HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n"))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\nHost: a\n\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"))
	f.Fuzz(func(t *testing.T, buf []byte) {
		if len(buf) > h1HeadMax {
			buf = buf[:h1HeadMax]
		}
		n, done := headEnd(buf)
		if !done {
			if n != 0 {
				t.Fatalf("headEnd = %d, false", n)
			}
			return
		}
		if n == 0 {
			return // net/http reads it
		}
		head := buf[:n]
		if n < 4 || string(head[n-4:]) != "\r\n\r\n" || strings.Contains(string(head[:n-2]), "\r\n\r\n") {
			t.Fatalf("headEnd = %d for %q", n, buf)
		}
		for i, c := range head {
			if c == '\n' && (i == 0 || head[i-1] != '\r') {
				t.Fatalf("bare LF in %q", head)
			}
		}
		// The bytes come in one read; a second read, which would move
		// what the reader holds, fails the test.
		src := &oneRead{data: buf, t: t}
		br := bufio.NewReaderSize(src, h1HeadMax)
		br.Peek(len(buf))
		r, err := http.ReadRequest(br)
		if err != nil || !frontable(r) {
			return
		}
		if got := br.Buffered(); got != len(buf)-n {
			t.Fatalf("ReadRequest left %d bytes of %d after a head of %d: %q", got, len(buf), n, buf)
		}
	})
}

// TestFrontMatchesServer sends each request twice on new connections: as
// is, which the HTTP/1.1 front serves, and padded above the front's 4 KiB
// head buffer, which sends the connection to net/http's server (what served
// every HTTP/1.1 request before the front). The client must get the same
// answer (status, fields but Date, framing, body, trailers) and Cells the
// same request (the padding field aside).
func TestFrontMatchesServer(t *testing.T) {
	rec := &recorder{Respond: func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		switch r.URL.Path {
		case "/stream":
			h.Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: 1\n\n")
			w.(http.Flusher).Flush()
			io.WriteString(w, "data: 2\n\n")
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
		case "/cached":
			h.Set("Etag", `"v1"`)
			w.WriteHeader(http.StatusNotModified)
		case "/hints":
			h.Add("Link", "</app.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			h.Set("Content-Type", "text/html")
			io.WriteString(w, "page")
		case "/trailer":
			h.Set("Trailer", "X-Checksum")
			h.Set("Content-Type", "application/octet-stream")
			io.WriteString(w, "body")
			h.Set("X-Checksum", "abc")
		case "/missing":
			h.Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			io.WriteString(w, `{"error":"none"}`)
		default:
			h.Set("Content-Type", "text/plain; charset=utf-8")
			h.Set("Cache-Control", "no-cache")
			h.Add("Set-Cookie", "a=1")
			h.Add("Set-Cookie", "b=2")
			io.WriteString(w, r.Method+" "+r.URL.RequestURI())
		}
	}}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	front := frontOf(t, tp)

	const host = "Host: cells.example\r\n"
	pad := "X-Pad: " + strings.Repeat("p", h1HeadMax) + "\r\n"
	for _, c := range []struct{ name, req string }{
		{"GET with a query", "GET /a/frontend/bundle.js?v=4.4.3&x=%zz HTTP/1.1\r\n" + host + "Accept: */*\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"},
		{"HEAD", "HEAD /io/obj HTTP/1.1\r\n" + host + "\r\n"},
		{"REST POST", "POST /a/tree/stats HTTP/1.1\r\n" + host + "Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"NodePaths\":[1]}"},
		{"PUT without a body", "PUT /a/x HTTP/1.1\r\n" + host + "Content-Length: 0\r\n\r\n"},
		{"DELETE", "DELETE /a/workspace/x HTTP/1.1\r\n" + host + "\r\n"},
		{"PROPFIND", "PROPFIND /dav/personal/ HTTP/1.1\r\n" + host + "Depth: 1\r\nUser-Agent:  davfs2/1.6  \r\n\r\n"},
		{"OPTIONS", "OPTIONS /a/config HTTP/1.1\r\n" + host + "Origin: https://sync.local\r\nAccess-Control-Request-Method: POST\r\n\r\n"},
		{"Connection: close", "GET /x HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n"},
		// fuzzHopHeaders but Upgrade and Trailer, which net/http's server serves.
		{"hop-by-hop and spoofed", "GET /x HTTP/1.1\r\n" + host + "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n" +
			"Proxy-Connection: keep-alive\r\nTe: gzip\r\nProxy-Authorization: Basic eA==\r\n" + fuzzSpoofHeaders + "Connection: User-Agent\r\nUser-Agent: gone\r\n\r\n"},
		{"stream", "GET /stream HTTP/1.1\r\n" + host + "\r\n"},
		{"204", "GET /empty HTTP/1.1\r\n" + host + "\r\n"},
		{"304", "GET /cached HTTP/1.1\r\n" + host + "If-None-Match: \"v1\"\r\n\r\n"},
		{"103 then 200", "GET /hints HTTP/1.1\r\n" + host + "\r\n"},
		{"trailers", "GET /trailer HTTP/1.1\r\n" + host + "Te: trailers\r\n\r\n"},
		{"404 from Cells", "GET /missing HTTP/1.1\r\n" + host + "\r\n"},
		{"another Host", "GET /x HTTP/1.1\r\nHost: other.example\r\n\r\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var answers [2]string
			var seens [2]string
			for i, padded := range []bool{false, true} {
				req := c.req
				if padded {
					line, rest, _ := strings.Cut(req, "\r\n")
					req = line + "\r\n" + pad + rest
				}
				before, n := front.handoffs.Load(), rec.count()
				answers[i] = answerTo(t, tp, req)
				if got := front.handoffs.Load() - before; got != int64(i) {
					t.Fatalf("padded %v: %d hand-overs, want %d", padded, got, i)
				}
				if rec.count() > n {
					s := rec.last(t)
					s.Header.Del("X-Pad")
					seens[i] = fmt.Sprintf("%s %s %s %s %v %q", s.Method, s.Host, s.RequestURI, s.Proto, s.Header, s.Body)
				}
			}
			if answers[0] != answers[1] {
				t.Errorf("the client got from the front\n%s\nand from net/http's server\n%s", answers[0], answers[1])
			}
			if seens[0] != seens[1] {
				t.Errorf("Cells got through the front\n%s\nand through net/http's server\n%s", seens[0], seens[1])
			}
		})
	}
}

// answerTo sends req on a new connection and describes what the client
// gets: every response up to the final one, Date aside.
func answerTo(t *testing.T, tp *testProxy, req string) string {
	t.Helper()
	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	defer conn.Close()
	io.WriteString(conn, req)
	method, _, _ := strings.Cut(req, " ")
	br := bufio.NewReader(conn)
	var b strings.Builder
	for {
		res, err := http.ReadResponse(br, &http.Request{Method: method})
		if err != nil {
			t.Fatalf("%q: %v", req, err)
		}
		body, err := io.ReadAll(res.Body)
		if err != nil {
			t.Fatalf("%q: body: %v", req, err)
		}
		res.Header.Del("Date")
		fmt.Fprintf(&b, "%d %v te=%v length=%d close=%v body=%q trailer=%v\n",
			res.StatusCode, res.Header, res.TransferEncoding, res.ContentLength, res.Close, body, res.Trailer)
		if res.StatusCode >= 200 {
			return b.String()
		}
	}
}

// TestFrontBodilessFraming: Cells' answers without a body may carry
// framing fields a Go server would not send (another server behind the
// upstream address, or one answering for Cells). The front leaves them out
// where net/http's server does: Content-Length and Transfer-Encoding on a
// 1xx, a 204 and a 304 (RFC 9110 forbids Content-Length on the 1xx and the
// 204), Content-Type on a 304; and where a body comes without a type,
// neither adds one (TestUntypedAnswer has the other paths). The client
// gets the same answer whichever of the two served it.
func TestFrontBodilessFraming(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		switch req.URL.Path {
		case "/204":
			io.WriteString(w, "HTTP/1.1 204 No Content\r\nContent-Length: 7\r\nX-A: 1\r\n\r\n")
		case "/304":
			io.WriteString(w, "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\nContent-Type: text/plain\r\nEtag: \"v1\"\r\n\r\n")
		case "/untyped":
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n<html>hi</html>")
		case "/103":
			io.WriteString(w, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nContent-Length: 9\r\n\r\n")
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
		return true
	})
	tp := rawProxy(t, up)
	pad := "X-Pad: " + strings.Repeat("p", h1HeadMax) + "\r\n"
	for _, path := range []string{"/204", "/304", "/103", "/untyped"} {
		line := "GET " + path + " HTTP/1.1\r\n"
		rest := "Host: cells.example\r\n\r\n"
		front, server := answerTo(t, tp, line+rest), answerTo(t, tp, line+pad+rest)
		if front != server {
			t.Errorf("%s: the client got from the front\n%s\nand from net/http's server\n%s", path, front, server)
		}
		if first, _, _ := strings.Cut(front, "\n"); path != "/untyped" && strings.Contains(first, "Content-Length") {
			t.Errorf("%s: Content-Length on a response without a body:\n%s", path, front)
		}
		if path == "/untyped" && strings.Contains(front, "Content-Type") {
			t.Errorf("%s: a Content-Type Cells did not send:\n%s", path, front)
		}
	}
}

// FuzzFrontConn sends arbitrary bytes to the public port (cleartext, as
// behind a load balancer with PROXY_TLS=off), then ends its side of the
// connection: whatever the bytes, the proxy must neither panic nor hang
// (the front answers, hands the connection over, or closes it). A front
// that stopped accepting would fail the next input the same way.
func FuzzFrontConn(f *testing.F) {
	for _, seed := range []string{
		"GET /small HTTP/1.1\r\nHost: cells.example\r\n\r\n",
		"GET /small HTTP/1.1\r\nHost: a\r\n\r\nHEAD /small HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.0\r\n\r\n",
		"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
		"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\nshort",
		"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
		"GET / HTTP/1.1\nHost: a\n\n",
		"GET / HTTP/1.1\r\nHost: a\r\nX: " + strings.Repeat("y", 5000) + "\r\n\r\n",
		"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"GET /small HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
		"\x16\x03\x01\x00\x05hello",
	} {
		f.Add([]byte(seed))
	}
	// HTTP/2 with prior knowledge: a GET, a POST with its body and a
	// PING, through h2conn and writeBehind to net/http's HTTP/2 server.
	var h2 bytes.Buffer
	h2.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&h2, nil)
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndStream: true, EndHeaders: true,
		BlockFragment: hpackBlock(":method", "GET", ":scheme", "http", ":path", "/chunked", ":authority", "a")})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, EndHeaders: true,
		BlockFragment: hpackBlock(":method", "POST", ":scheme", "http", ":path", "/count", ":authority", "a", "content-length", "5")})
	fr.WriteData(3, true, []byte("hello"))
	fr.WritePing(false, [8]byte{1})
	f.Add(h2.Bytes())

	rec := &recorder{}
	up := frontUpstream(f, rec)
	cfg := testConfig(up)
	cfg.TLS = false
	cfg.ReadHeaderTimeout = 2 * time.Second
	tp := startProxy(f, cfg)
	addr := tp.Addr().String()
	f.Fuzz(func(t *testing.T, data []byte) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		conn.Write(data)
		conn.(*net.TCPConn).CloseWrite()
		if _, err := io.Copy(io.Discard, conn); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the proxy neither answered nor closed within 10 s after %q", data)
			}
		}
	})
}

// oneRead gives its data in one read and fails the test on any later one.
type oneRead struct {
	data []byte
	done bool
	t    *testing.T
}

func (r *oneRead) Read(p []byte) (int, error) {
	if r.done {
		r.t.Fatalf("a second read from the connection after a whole head: %q", r.data)
	}
	r.done = true
	return copy(p, r.data), nil
}

// pipelineAnswers sends raw on a new connection, then reads responses until the
// proxy closes or 3 s pass; it describes them (Date aside).
func pipelineAnswers(t *testing.T, tp *testProxy, raw string, methods []string) string {
	t.Helper()
	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	go io.WriteString(conn, raw)
	br := bufio.NewReader(conn)
	var b strings.Builder
	for i := 0; ; i++ {
		m := "GET"
		if i < len(methods) {
			m = methods[i]
		}
		res, err := http.ReadResponse(br, &http.Request{Method: m})
		if err != nil {
			fmt.Fprintf(&b, "end: %v\n", err)
			return b.String()
		}
		body, err := io.ReadAll(res.Body)
		res.Header.Del("Date")
		fmt.Fprintf(&b, "%d te=%v length=%d close=%v body=%q err=%v\n", res.StatusCode, res.TransferEncoding, res.ContentLength, res.Close, body, err)
		if res.StatusCode < 200 {
			i--
		}
	}
}

// TestFrontPipelinedMatchesServer sends each sequence of pipelined requests
// twice: as is, served by the front, and with the first head padded past
// h1HeadMax, so that net/http's server serves the whole connection. The
// client and Cells must see the same in both.
func TestFrontPipelinedMatchesServer(t *testing.T) {
	tp, rec := startEchoProxy(t, nil)
	const host = "Host: cells.example\r\n"
	pad := "X-Pad: " + strings.Repeat("p", h1HeadMax) + "\r\n"
	cases := []struct {
		name    string
		reqs    []string
		methods []string
	}{
		{"GET with body", []string{"GET /a HTTP/1.1\r\n" + host + "Content-Length: 5\r\n\r\nGET /", "GET /b HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n"}, []string{"GET", "GET"}},
		{"HEAD with body", []string{"HEAD /a HTTP/1.1\r\n" + host + "Content-Length: 0005\r\n\r\nHEAD ", "GET /b HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n"}, []string{"HEAD", "GET"}},
		{"OPTIONS dup CL", []string{"OPTIONS /a HTTP/1.1\r\n" + host + "Content-Length: 3\r\nContent-Length:  3 \r\n\r\nxyz", "GET /b HTTP/1.1\r\n" + host + "\r\n", "GET /c HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n"}, []string{"OPTIONS", "GET", "GET"}},
		{"then HTTP/1.0", []string{"GET /a HTTP/1.1\r\n" + host + "\r\n", "GET /b HTTP/1.0\r\n" + host + "\r\n", "GET /c HTTP/1.1\r\n" + host + "\r\n"}, nil},
		{"then bare LF", []string{"GET /a HTTP/1.1\r\n" + host + "\r\n", "GET /b HTTP/1.1\n" + "Host: x\n\n", "GET /c HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n"}, nil},
		{"then fold", []string{"GET /a HTTP/1.1\r\n" + host + "\r\n", "GET /b HTTP/1.1\r\n" + host + "X: a\r\n b\r\nContent-Length: 1\r\n 2\r\n\r\nGET /c HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n"}, nil},
		{"CRLF after POST", []string{"POST /a HTTP/1.1\r\n" + host + "Content-Length: 3\r\n\r\nabc\r\n", "GET /b HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n"}, []string{"POST", "GET"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var answers [2]string
			var seens [2]string
			for i, padded := range []bool{false, true} {
				first := c.reqs[0]
				if padded {
					line, rest, _ := strings.Cut(first, "\r\n")
					first = line + "\r\n" + pad + rest
				}
				raw := first + strings.Join(c.reqs[1:], "")
				n := rec.count()
				answers[i] = pipelineAnswers(t, tp, raw, c.methods)
				time.Sleep(50 * time.Millisecond)
				var s strings.Builder
				for _, r := range rec.all()[n:] {
					fmt.Fprintf(&s, "%s %s %q\n", r.Method, r.RequestURI, r.Body)
				}
				seens[i] = s.String()
			}
			if answers[0] != answers[1] {
				t.Errorf("client got from the front\n%s\nand from net/http's server\n%s", answers[0], answers[1])
			}
			if seens[0] != seens[1] {
				t.Errorf("Cells got through the front\n%s\nand through net/http's server\n%s", seens[0], seens[1])
			}
		})
	}
}

// TestFrontCRLFAfterPOST: net/http's server skips up to four CR or LF
// bytes before the request that follows a POST (server.go, readRequest:
// "RFC 7230 section 3 tolerance for old buggy clients"), and so does the
// front now. It used to serve the POST, then hand the connection over at
// the CRLF to net/http's server, which, knowing no previous method,
// answered the next request 400 and closed (found by review).
func TestFrontCRLFAfterPOST(t *testing.T) {
	tp, _ := startEchoProxy(t, nil)
	const host = "Host: cells.example\r\n"
	got := pipelineAnswers(t, tp, "POST /a HTTP/1.1\r\n"+host+"Content-Length: 3\r\n\r\nabc\r\n"+
		"GET /b HTTP/1.1\r\n"+host+"Connection: close\r\n\r\n", []string{"POST", "GET"})
	if !strings.Contains(got, `body="GET /b"`) {
		t.Errorf("the GET after a POST and a CRLF was not served:\n%s", got)
	}
}

// TestFrontCRLFAfterPOSTThenIdle: the CR and LF after a POST are not the
// next request's: a client that pauses after them, longer than
// PROXY_READ_HEADER_TIMEOUT but within PROXY_IDLE_TIMEOUT, as a
// kept-alive connection may, still has its next request served.
func TestFrontCRLFAfterPOSTThenIdle(t *testing.T) {
	t.Parallel()
	const readHeader = 200 * time.Millisecond
	tp, _ := startEchoProxy(t, func(c *Config) {
		c.ReadHeaderTimeout = readHeader
		c.IdleTimeout = time.Minute
	})
	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(conn)
	io.WriteString(conn, "POST /a HTTP/1.1\r\nHost: cells.example\r\nContent-Length: 3\r\n\r\nabc\r\n")
	if _, body := readResponse(t, br, "POST"); body != "POST /a" {
		t.Fatalf("POST: %q", body)
	}
	time.Sleep(5 * readHeader)
	if _, err := io.WriteString(conn, "GET /b HTTP/1.1\r\nHost: cells.example\r\n\r\n"); err != nil {
		t.Fatalf("the proxy closed the connection while the client paused: %v", err)
	}
	res, err := http.ReadResponse(br, &http.Request{Method: "GET"})
	if err != nil {
		t.Fatalf("GET after the pause: %v (the connection was closed after PROXY_READ_HEADER_TIMEOUT, not PROXY_IDLE_TIMEOUT)", err)
	}
	body, _ := io.ReadAll(res.Body)
	if string(body) != "GET /b" {
		t.Errorf("GET after the pause: %d %q", res.StatusCode, body)
	}
}

// TestFrontUnreadBodyKeepsConnection: the proxy answers a small request
// without reading its body (421 for a Host outside PROXY_SERVER_NAMES).
// net/http's server then reads the rest of the body and keeps the
// connection, as it announced nothing else; the front used to close it
// half a second later without a Connection: close, so the next request on
// it, sent at once or pipelined, was lost (a POST failed in the client).
// Both must answer the next request.
func TestFrontUnreadBodyKeepsConnection(t *testing.T) {
	tp, rec := startEchoProxy(t, func(c *Config) { c.ServerNames = []string{"cells.example"} })
	const refused = "POST /a HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 5\r\n\r\nhello"
	const next = "POST /b HTTP/1.1\r\nHost: cells.example\r\nContent-Length: 2\r\n\r\n{}"
	pad := "X-Pad: " + strings.Repeat("p", h1HeadMax) + "\r\n"
	for _, padded := range []bool{false, true} {
		first := refused
		if padded {
			line, rest, _ := strings.Cut(first, "\r\n")
			first = line + "\r\n" + pad + rest
		}
		t.Run(fmt.Sprintf("padded=%v/after the answer", padded), func(t *testing.T) {
			conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
			defer conn.Close()
			br := bufio.NewReader(conn)
			io.WriteString(conn, first)
			if res, _ := readResponse(t, br, "POST"); res.StatusCode != http.StatusMisdirectedRequest {
				t.Fatalf("foreign Host: %d, want 421", res.StatusCode)
			}
			io.WriteString(conn, next)
			res, err := http.ReadResponse(br, &http.Request{Method: "POST"})
			if err != nil {
				t.Fatalf("the request after a 421 got no answer: %v", err)
			}
			if body, _ := io.ReadAll(res.Body); res.StatusCode != 200 || string(body) != "POST /b" {
				t.Errorf("the request after a 421: %d %q", res.StatusCode, body)
			}
		})
		t.Run(fmt.Sprintf("padded=%v/pipelined", padded), func(t *testing.T) {
			n := rec.count()
			last := strings.Replace(next, "\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1)
			got := pipelineAnswers(t, tp, first+last, []string{"POST", "POST"})
			if !strings.Contains(got, `body="POST /b"`) {
				t.Errorf("the request pipelined after a 421 was not answered:\n%s", got)
			}
			if seen := rec.all()[n:]; len(seen) != 1 || seen[0].RequestURI != "/b" {
				t.Errorf("Cells saw %d requests, want only /b", len(seen))
			}
		})
	}
}

// startEchoProxy starts a proxy in front of a Cells that answers each
// request with its method and request-target, and records it; configure,
// if not nil, adjusts the proxy's configuration first.
func startEchoProxy(t *testing.T, configure func(*Config)) (*testProxy, *recorder) {
	t.Helper()
	rec := &recorder{Respond: func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Method+" "+r.URL.RequestURI())
	}}
	cfg := testConfig(newUpstream(t, upTLS, rec))
	if configure != nil {
		configure(cfg)
	}
	return startProxy(t, cfg), rec
}
