package proxy

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

// What Cells' main port answers crosses much of the proxy's own code
// before the client sees it: the direct path's read of the response
// (upBody, the idle peek), the gathering of downloads, the header and
// trailer relay (hop-by-hop fields, forbidden trailers, a 204's length),
// 1xx answers, the HTTP/1.1 front's response writer and net/http's HTTP/2
// server. FuzzUpstreamResponse puts arbitrary bytes there.

// serveH1Script reads one request head, to its blank line, and the body
// its Content-Length declares, sends answer as it is and closes the
// connection.
func serveH1Script(nc *scriptConn, answer, _ []byte) {
	defer nc.Close()
	// A guard: the test fails on its own bound first.
	nc.SetDeadline(time.Now().Add(time.Minute))
	br := bufio.NewReader(nc)
	var length int64
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return
		}
		if len(line) <= 2 {
			break
		}
		if name, value, ok := strings.Cut(string(line), ":"); ok && strings.EqualFold(name, "Content-Length") {
			length, _ = strconv.ParseInt(strings.TrimSpace(value), 10, 64)
		}
	}
	if _, err := io.CopyN(io.Discard, br, length); err != nil {
		return
	}
	nc.Write(answer)
}

// startScriptedProxy starts a proxy whose Cells (CELLS_UPSTREAM, cleartext)
// is a scriptedCells serving HTTP/1.1 answers.
func startScriptedProxy(t testing.TB) (*testProxy, *scriptedCells) {
	t.Helper()
	cells := newScriptedCells(t, serveH1Script)
	cfg := testConfig(nil)
	cfg.Upstream = &url.URL{Scheme: "http", Host: cells.ln.Addr().String()}
	return startProxy(t, cfg), cells
}

// Requests of scriptedRequest, by kind: each takes another of the proxy's
// paths to Cells.
var scriptedKinds = []struct {
	method, path string
	body         int  // bytes, with a Content-Length
	upgrade      bool // a websocket handshake (HTTP/1.1 clients only)
}{
	{"GET", "/fuzz", 0, false},
	{"HEAD", "/fuzz", 0, false},
	{"POST", "/fuzz", 5, false},       // a small body: the direct path
	{"PUT", "/fuzz", 64 << 10, false}, // an upload: ReverseProxy
	{"GET", "/ws/event", 0, true},
}

// scriptedRequest sends a request of scriptedKinds[kind] (modulo their
// number) through tp over HTTP/1.1 or HTTP/2 to a Cells that answers with
// answer, and reads the whole response. It fails t if nothing, neither a
// response nor an error, has come within 20 s: Cells has closed the
// connection after its answer.
func scriptedRequest(t *testing.T, tp *testProxy, cells *scriptedCells, h2 bool, kind uint8, answer []byte) (*http.Response, []byte, error) {
	t.Helper()
	cells.round(answer, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	k := scriptedKinds[int(kind)%len(scriptedKinds)]
	var body io.Reader
	if k.body > 0 {
		body = bytes.NewReader(bytes.Repeat([]byte("u"), k.body))
	}
	req, err := http.NewRequestWithContext(ctx, k.method, tp.URL+k.path, body)
	if err != nil {
		t.Fatal(err)
	}
	if k.upgrade && !h2 {
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	}
	c := tp.H1
	if h2 {
		c = tp.H2
	}
	res, err := c.Do(req)
	if err == nil {
		var body []byte
		body, err = io.ReadAll(res.Body)
		res.Body.Close()
		if ctx.Err() == nil {
			return res, body, err
		}
	}
	if ctx.Err() != nil {
		t.Fatalf("%s %s over HTTP/2 %v: no answer within 20 s (%v) to Cells' answer %q", k.method, k.path, h2, err, answer)
	}
	return res, nil, err
}

// TestScriptedCellsH1Answer: the fuzz target's scripted Cells does reach
// the client, over both protocols: its answer arrives, status, fields,
// body and trailers, and an answer cut short is not taken for a whole one.
func TestScriptedCellsH1Answer(t *testing.T) {
	t.Parallel()
	tp, cells := startScriptedProxy(t)
	for _, h2 := range []bool{false, true} {
		res, body, err := scriptedRequest(t, tp, cells, h2, 0,
			[]byte("HTTP/1.1 201 Created\r\nX-Cells: yes\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n"))
		if err != nil || res.StatusCode != 201 || res.Header.Get("X-Cells") != "yes" || string(body) != "ok" || res.Trailer.Get("X-Sum") != "1" {
			t.Errorf("HTTP/2 %v: %v; want 201, X-Cells: yes, body ok, trailer X-Sum: 1", h2, describe(res, body, err))
		}
		res, body, err = scriptedRequest(t, tp, cells, h2, 0, []byte("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"))
		if err == nil {
			t.Errorf("HTTP/2 %v, an answer cut short: %v; want the read to fail", h2, describe(res, body, err))
		}
	}
}

// describe is a response as a test failure shows it.
func describe(res *http.Response, body []byte, err error) string {
	if res == nil {
		return "error " + err.Error()
	}
	s := res.Status + ", " + res.Proto
	for k, v := range res.Header {
		s += ", " + k + ": " + strings.Join(v, ", ")
	}
	s += ", body " + string(body)
	for k, v := range res.Trailer {
		s += ", trailer " + k + ": " + strings.Join(v, ", ")
	}
	if err != nil {
		s += ", error " + err.Error()
	}
	return s
}

// FuzzUpstreamResponse: whatever Cells' main port answers to a GET, a
// HEAD, a POST with a small body, an upload or a websocket handshake, over
// HTTP/1.1 or HTTP/2, the proxy must not panic and the client must get a
// response or an error once Cells has closed the connection. A proxy that
// stopped serving would fail the next input the same way.
func FuzzUpstreamResponse(f *testing.F) {
	for _, seed := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n2\r\nok\r\n0\r\nX-Sum: 1\r\nContent-Length: 9\r\nX-Late: 2\r\n\r\n",
		"HTTP/1.1 200 OK\r\n\r\nuntil the connection closes",
		"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
		"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 100\r\n\r\n",
		"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframes",
		"HTTP/1.1 200 OK\r\nConnection: X-Hop, close\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbad\r\n",
		"HTTP/1.1 302 Found\r\nLocation: /starting.html\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
		"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"cells\"\r\nContent-Length: 4\r\n\r\nno\r\n",
		"HTTP/1.1 999 Strange\r\nX: " + string(make([]byte, 300)) + "\r\n\r\n",
		"HTTP/1.1 200 OK\nContent-Length: 1\n\nx",
		"garbage\r\n\r\n",
	} {
		for kind := range scriptedKinds {
			for _, h2 := range []bool{false, true} {
				f.Add(h2, uint8(kind), []byte(seed))
			}
		}
	}
	tp, cells := startScriptedProxy(f)
	f.Fuzz(func(t *testing.T, h2 bool, kind uint8, answer []byte) {
		scriptedRequest(t, tp, cells, h2, kind, answer)
	})
}
