package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"
)

// An upload crosses code of the proxy's own between the client and Cells:
// the HTTP/1.1 front's read of the head and its hand-over of the connection
// (with what it had read past the head) to net/http's server, the direct
// path's small bodies, and the batching of what the client sent into 64 KiB
// writes to Cells (upload.go). FuzzUpload sends bodies of any size in
// pieces of any size, with pauses, and checks that Cells gets every byte.

// pause is the gap a piece asks for: long enough for the proxy to copy
// what it has and wait for more.
const uploadPause = time.Millisecond

// pieceReader returns the pieces one read each, pausing where asked.
type pieceReader struct {
	pieces [][]byte
	pauses []bool
}

func (r *pieceReader) Read(p []byte) (int, error) {
	if len(r.pieces) == 0 {
		return 0, io.EOF
	}
	if r.pauses[0] {
		time.Sleep(uploadPause)
		r.pauses[0] = false
	}
	n := copy(p, r.pieces[0])
	if r.pieces[0] = r.pieces[0][n:]; len(r.pieces[0]) == 0 {
		r.pieces, r.pauses = r.pieces[1:], r.pauses[1:]
	}
	return n, nil
}

// uploadModes are the ways a client sends a body.
var uploadModes = []string{"sized", "chunked", "expect"}

// rawUpload sends a PUT of body over a raw HTTP/1.1 connection to tp, in
// the given pieces, each a write of its own (a chunk of its own when
// chunked), and in the write of its last bytes the head of a GET behind it,
// as a pipelining client does. It returns the PUT's answer, and the GET's
// unless the proxy closed the connection after the PUT.
func rawUpload(t *testing.T, tp *testProxy, mode string, body, cuts []byte) (put string, get string, getSent bool) {
	t.Helper()
	conn := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
	conn.SetDeadline(time.Now().Add(30 * time.Second)) // a guard: the test fails on its own bound first
	br := bufio.NewReader(conn)
	head := "PUT /up HTTP/1.1\r\nHost: cells.example\r\n"
	switch mode {
	case "sized":
		head += "Content-Length: " + strconv.Itoa(len(body)) + "\r\n"
	case "expect":
		head += "Content-Length: " + strconv.Itoa(len(body)) + "\r\nExpect: 100-continue\r\n"
	case "chunked":
		head += "Transfer-Encoding: chunked\r\n"
	}
	if _, err := io.WriteString(conn, head+"\r\n"); err != nil {
		t.Fatal(err)
	}
	if mode == "expect" && len(body) > 0 {
		res, err := http.ReadResponse(br, &http.Request{Method: "PUT"})
		if err != nil || res.StatusCode != http.StatusContinue {
			t.Fatalf("%s, %d bytes: %v, %v; want 100 Continue", mode, len(body), res, err)
		}
	}
	next := "GET /after HTTP/1.1\r\nHost: cells.example\r\n\r\n"
	pieces, pauses := cutPieces(body, cuts)
	var out []byte
	for i, p := range pieces {
		out = out[:0]
		if mode == "chunked" {
			out = fmt.Appendf(out, "%x", len(p))
			if i%2 == 1 {
				out = append(out, ";ext=1"...) // a chunk extension, which the proxy drops
			}
			out = append(out, "\r\n"...)
		}
		out = append(out, p...)
		if mode == "chunked" {
			out = append(out, "\r\n"...)
		}
		if i == len(pieces)-1 {
			if mode == "chunked" {
				out = append(out, "0\r\n\r\n"...)
			}
			out = append(out, next...)
		}
		if _, err := conn.Write(out); err != nil {
			t.Fatalf("%s, %d bytes: piece %d: %v", mode, len(body), i, err)
		}
		if pauses[i] {
			time.Sleep(uploadPause)
		}
	}
	if len(pieces) == 0 {
		if mode == "chunked" {
			next = "0\r\n\r\n" + next
		}
		if _, err := io.WriteString(conn, next); err != nil {
			t.Fatal(err)
		}
	}
	read := func(what string) (string, bool) {
		res, err := http.ReadResponse(br, &http.Request{Method: "PUT"})
		for err == nil && res.StatusCode == http.StatusContinue && mode == "expect" {
			res, err = http.ReadResponse(br, &http.Request{Method: "PUT"})
		}
		if err != nil {
			t.Fatalf("%s, %d bytes: %s: %v", mode, len(body), what, err)
		}
		b, err := io.ReadAll(res.Body)
		if err != nil {
			t.Fatalf("%s, %d bytes: %s's body: %v", mode, len(body), what, err)
		}
		return fmt.Sprintf("%d %s", res.StatusCode, b), res.Close
	}
	put, closed := read("the PUT's answer")
	if closed {
		return put, "", false
	}
	get, _ = read("the GET's answer, pipelined behind the PUT")
	return put, get, true
}

// FuzzUpload: a body of any size, sent in pieces of any size with pauses,
// with a length, chunked or after Expect: 100-continue, over HTTP/1.1 (raw,
// with a GET pipelined behind it) or HTTP/2 (net/http's client, a DATA
// frame per piece), to a cleartext or a TLS Cells: Cells reads every byte,
// in order (its length and SHA-256 come back in the answer), and the GET
// behind it is answered too.
func FuzzUpload(f *testing.F) {
	for _, s := range []struct {
		size uint32
		cuts []byte
	}{
		{0, nil},
		{1, nil},
		{5, []byte{0x40}}, // a byte a write: the direct path's small body
		{64 << 10, []byte{0x0f, 0x0f, 0x0f, 0x0f}}, // 16 KiB pieces
		{64<<10 + 1, []byte{0x3f}},                 // one piece of 64 KiB and one byte
		{200001, []byte{0x41, 0x80 | 0x07, 0x7f, 0x1f}},
		{300 << 10, []byte{0x80 | 0x3f}},
	} {
		for mode := range uploadModes {
			for _, h2 := range []bool{false, true} {
				for _, withTLS := range []bool{false, true} {
					f.Add(withTLS, h2, uint8(mode), s.size, s.cuts)
				}
			}
		}
	}
	var proxies [2]*testProxy
	for i, kind := range []upstreamKind{upPlain, upTLS} {
		up, _, _ := hashingUpstream(f, kind)
		settle(f, up)
		proxies[i] = startProxy(f, testConfig(up))
	}
	f.Fuzz(func(t *testing.T, withTLS, h2 bool, modeN uint8, size uint32, cuts []byte) {
		tp := proxies[0]
		if withTLS {
			tp = proxies[1]
		}
		mode := uploadModes[int(modeN)%len(uploadModes)]
		body := patternBody(int(size % (512 << 10)))
		want := fmt.Sprintf("200 %d %s", len(body), sha(body))
		if !h2 {
			put, get, getSent := rawUpload(t, tp, mode, body, cuts)
			if put != want {
				t.Fatalf("HTTP/1.1, %s, %d bytes in pieces %x: Cells answered %q, want %q", mode, len(body), cuts, put, want)
			}
			if wantGet := "200 0 " + sha(nil); getSent && get != wantGet {
				t.Fatalf("HTTP/1.1, %s, %d bytes: the GET behind it got %q, want %q", mode, len(body), get, wantGet)
			}
			return
		}
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		pieces, pauses := cutPieces(body, cuts)
		req, err := http.NewRequestWithContext(ctx, "PUT", tp.URL+"/up", &pieceReader{pieces, pauses})
		if err != nil {
			t.Fatal(err)
		}
		req.ContentLength = int64(len(body))
		switch mode {
		case "chunked":
			req.ContentLength = -1 // HTTP/2 has no chunks: a body of unknown length
		case "expect":
			req.Header.Set("Expect", "100-continue")
		}
		if len(body) == 0 && req.ContentLength == 0 {
			req.Body = http.NoBody
		}
		res, err := tp.H2.Do(req)
		if err != nil {
			t.Fatalf("HTTP/2, %s, %d bytes in pieces %x: %v", mode, len(body), cuts, err)
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		if got := fmt.Sprintf("%d %s", res.StatusCode, b); err != nil || got != want {
			t.Fatalf("HTTP/2, %s, %d bytes in pieces %x: Cells answered %q (%v), want %q", mode, len(body), cuts, got, err, want)
		}
	})
}
