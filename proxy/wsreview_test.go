package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// splitConn writes each Write in pieces, each its own TCP segment (Go sets
// TCP_NODELAY) with a pause between: under TLS, the peer's socket becomes
// readable with a TLS record header cut in two, then with part of the
// record, then with its end.
type splitConn struct {
	net.Conn
}

func (c *splitConn) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := 3 // a record header cut in two
		if written > 0 {
			n = 4000
		}
		n = min(n, len(p))
		m, err := c.Conn.Write(p[:n])
		written += m
		if err != nil {
			return written, err
		}
		p = p[n:]
		if len(p) > 0 {
			time.Sleep(2 * time.Millisecond)
		}
	}
	return written, nil
}

type splitListener struct{ net.Listener }

func (l splitListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &splitConn{Conn: c}, nil
}

// splitUpstream is a Cells over TLS whose every write reaches the proxy in
// pieces (splitConn), answering upgrades with serve as wsRawUp does.
func splitUpstream(t *testing.T, serve func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request)) *testUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := SelfSigned("localhost", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	u := &testUpstream{ln: ln, CAFile: writeCertPEM(t, cert), Srv: &http.Server{
		Handler:  hijacker(func(r *http.Request) bool { return r.Header.Get("Upgrade") == "" }, serve),
		ErrorLog: slog.NewLogLogger(slog.DiscardHandler, slog.LevelError),
	}}
	u.Srv.Protocols = new(http.Protocols)
	u.Srv.Protocols.SetHTTP1(true)
	u.Srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
	u.URL = &url.URL{Scheme: "https", Host: ln.Addr().String()}
	go u.Srv.Serve(tls.NewListener(splitListener{ln}, u.Srv.TLSConfig))
	t.Cleanup(func() { u.Close() })
	return u
}

// reviewFrames is a mix of frames: small ones written one by one, several
// in one write, and one larger than a TLS record and the pumps' buffer.
func reviewFrames(masked bool, seed byte) [][]byte {
	var writes [][]byte
	for i := range 5 {
		writes = append(writes, wsFrame(fmt.Sprintf("small %d/%d", seed, i), masked))
	}
	var batch []byte
	for i := range 8 {
		batch = append(batch, wsFrame(fmt.Sprintf("batched %d/%d", seed, i), masked)...)
	}
	writes = append(writes, batch)
	big := make([]byte, 100<<10)
	for i := range big {
		big[i] = byte(i*7) + seed
	}
	writes = append(writes, frameOf(0x2, big, masked))
	writes = append(writes, wsFrame("last", masked))
	return writes
}

// TestWSReviewSplitRecords: both ends write at the same time, and each of
// their TLS records reaches the proxy cut across TCP segments, with pauses
// between the pieces: a pump finds, at a frame boundary, part of a record
// held inside crypto/tls, and must park and wake for the rest without
// losing, repeating or reordering a byte, either way.
func TestWSReviewSplitRecords(t *testing.T) {
	t.Parallel()
	fromClient := reviewFrames(true, 1)
	fromCells := reviewFrames(false, 2)
	gotc := make(chan []byte, 1)
	up := splitUpstream(t, func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request) {
		brw.WriteString(accept101(r))
		brw.Flush()
		done := make(chan struct{})
		go func() {
			defer close(done)
			for _, w := range fromCells {
				if _, err := conn.Write(w); err != nil {
					return
				}
			}
		}()
		b := make([]byte, len(bytes.Join(fromClient, nil)))
		n, _ := io.ReadFull(brw, b)
		gotc <- b[:n]
		<-done
		io.Copy(io.Discard, brw) // until the client goes
	})
	tp := startProxy(t, testConfig(up))
	conn := tp.tlsOver(t, func(c net.Conn) net.Conn { return &splitConn{Conn: c} })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	readWS101(t, tp, conn)
	go func() {
		for _, w := range fromClient {
			if _, err := conn.Write(w); err != nil {
				return
			}
		}
	}()
	want := bytes.Join(fromCells, nil)
	got := make([]byte, len(want))
	n, err := io.ReadFull(conn, got)
	if !bytes.Equal(got[:n], want) {
		t.Errorf("the client got %d bytes (%v), not the %d Cells sent: first difference at %d", n, err, len(want), firstDiff(got[:n], want))
	}
	var fromC []byte
	select {
	case fromC = <-gotc:
	case <-time.After(10 * time.Second):
		t.Fatal("Cells read nothing in 10 s")
	}
	if want := bytes.Join(fromClient, nil); !bytes.Equal(fromC, want) {
		t.Errorf("Cells got %d bytes, not the %d the client sent: first difference at %d", len(fromC), len(want), firstDiff(fromC, want))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestWSReviewRefusedNotTunnel: Cells answers an upgrade with something
// other than 101 (200 with a body, a redirect, 400). The client gets that
// answer whole, and the bytes it sent behind its request (frames, for a
// client that did not wait) never reach Cells: the connection did not
// become a tunnel.
func TestWSReviewRefusedNotTunnel(t *testing.T) {
	t.Parallel()
	seen := make(chan string, 3) // what Cells read on upgrade connections after the answer
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A declared length: the handler hijacks after its answer,
		// which would cut a chunked body before its last chunk.
		answer := func(code int, body string) {
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			w.WriteHeader(code)
			io.WriteString(w, body)
		}
		switch r.URL.Path {
		case "/ws/ok":
			answer(200, "plain page")
		case "/ws/moved":
			w.Header().Set("Location", "/elsewhere")
			answer(302, "<a href=\"/elsewhere\">Found</a>.")
		case "/ws/bad":
			answer(400, "bad upgrade")
		default:
			io.WriteString(w, "ok")
			return
		}
		if r.Header.Get("Upgrade") == "" {
			return
		}
		// What comes next on this connection, if anything.
		http.NewResponseController(w).Flush()
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.Flush()
		conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		b, _ := io.ReadAll(brw)
		seen <- string(b)
	}))
	tp := startProxy(t, testConfig(up))
	host := tp.Addr().String()
	for _, tc := range []struct {
		path       string
		status     int
		bodyPrefix string
	}{
		{"/ws/ok", 200, "plain page"},
		{"/ws/moved", 302, "<a href=\"/elsewhere\">"},
		{"/ws/bad", 400, "bad upgrade"},
	} {
		t.Run(strings.TrimPrefix(tc.path, "/ws/"), func(t *testing.T) {
			conn := tp.dialRaw(t, host, "http/1.1")
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			req := "GET " + tc.path + " HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
				"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
			conn.Write(append([]byte(req), wsFrame("early frame", true)...))
			br := bufio.NewReader(conn)
			res, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(res.Body)
			if err != nil {
				t.Errorf("body: %v", err)
			}
			if res.StatusCode != tc.status || !strings.HasPrefix(string(body), tc.bodyPrefix) {
				t.Errorf("status %d body %q, want %d %q...", res.StatusCode, body, tc.status, tc.bodyPrefix)
			}
		})
	}
	for range 3 {
		// The proxy closes Cells' connection after a refusal: the frame
		// sent behind the request (masked, so its first byte, 0x81, is
		// what shows) never follows the answer there.
		if s := recv(t, seen, "Cells' read after its answer"); strings.Contains(s, "\x81") {
			t.Errorf("Cells read %q after a refused upgrade", s)
		}
	}
}

// TestWSReviewNoCrossTalk: hundreds of websockets open, park, wake and end
// at the same time, some closing cleanly and some dropping their
// connection, so that the descriptors of ended tunnels are reused by new
// ones while others are parked. Every echo carries its own socket's
// number: no byte goes to another tunnel, and none outlives the test.
func TestWSReviewNoCrossTalk(t *testing.T) {
	t.Parallel()
	const sockets, atOnce = 240, 60
	wsUp := newWSUpstream(nil)
	wsUp.ended = make(chan error, sockets)
	tp := startProxy(t, testConfig(newUpstream(t, upTLS, wsUp)))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sem := make(chan struct{}, atOnce)
	var wg sync.WaitGroup
	for i := range sockets {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, _, err := websocket.Dial(ctx, wsURL(tp, "/ws/event"), &websocket.DialOptions{HTTPClient: tp.H1})
			if err != nil {
				t.Errorf("socket %d: dial: %v", i, err)
				return
			}
			defer c.CloseNow()
			for k := range 3 {
				msg := fmt.Sprintf("socket %d message %d %s", i, k, strings.Repeat("x", (i*37+k*1000)%3000))
				if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
					t.Errorf("socket %d: write %d: %v", i, k, err)
					return
				}
				_, b, err := c.Read(ctx)
				if err != nil {
					t.Errorf("socket %d: read %d: %v", i, k, err)
					return
				}
				if string(b) != msg {
					t.Errorf("socket %d: echo %d is %.40q..., want %.40q...", i, k, b, msg)
					return
				}
				time.Sleep(time.Millisecond) // both pumps park
			}
			if i%2 == 0 {
				c.Close(websocket.StatusNormalClosure, "")
			}
			// Odd sockets drop their connection (CloseNow, deferred).
		})
	}
	wg.Wait()
	settleTunnels(t, tp)
}

// TestWSReviewPlainUpstreamLastWords: a Cells without TLS
// (CELLS_SITE_NO_TLS=1) sends its 101, frames longer than the handshake's
// 4 KiB reader and its close frame in one write, and closes at once: the
// client gets every byte, those the handshake's reader took and those still
// on the socket behind them, then the end.
func TestWSReviewPlainUpstreamLastWords(t *testing.T) {
	t.Parallel()
	big := make([]byte, 10<<10)
	for i := range big {
		big[i] = byte(i * 13)
	}
	frames := bytes.Join([][]byte{wsFrame("first", false), frameOf(0x2, big, false), wsFrame("second", false), closeFrame(1000, "bye", false)}, nil)
	up := newUpstream(t, upPlain, hijacker(func(r *http.Request) bool { return r.Header.Get("Upgrade") == "" }, func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request) {
		brw.WriteString(accept101(r))
		brw.Write(frames)
		brw.Flush()
	}))
	tp := startProxy(t, testConfig(up))
	conn := rawWS(t, tp)
	got, err := io.ReadAll(conn)
	if !bytes.Equal(got, frames) {
		t.Errorf("the client got %d bytes then %v, want the %d Cells sent: first difference at %d", len(got), err, len(frames), firstDiff(got, frames))
	}
}

// TestWSReviewLargeEarlyFrames: a client sends its upgrade request and,
// without waiting for the 101, 40 KiB of frames and its close frame, then
// ends its side: more than net/http's and the front's buffers hold, so the
// frames are split between those buffers, crypto/tls and the socket. Cells
// gets them all, in order.
func TestWSReviewLargeEarlyFrames(t *testing.T) {
	t.Parallel()
	var frames []byte
	for i := range 40 {
		p := make([]byte, 1000+i)
		for j := range p {
			p[j] = byte(i + j)
		}
		frames = append(frames, frameOf(0x2, p, true)...)
	}
	frames = append(frames, closeFrame(1000, "bye", true)...)
	gotc := make(chan []byte, 1)
	up := wsRawUp(t, func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request) {
		brw.WriteString(accept101(r))
		brw.Flush()
		b := make([]byte, len(frames))
		n, _ := io.ReadFull(brw, b)
		gotc <- b[:n]
		io.Copy(io.Discard, brw)
	})
	tp := startProxy(t, testConfig(up))
	host := tp.Addr().String()
	conn := tp.dialRaw(t, host, "http/1.1")
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /ws/event HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
	if _, err := conn.Write(append([]byte(req), frames...)); err != nil {
		t.Fatal(err)
	}
	conn.CloseWrite()
	got := recv(t, gotc, "Cells' read")
	if !bytes.Equal(got, frames) {
		t.Errorf("Cells got %d bytes, want the %d the client sent: first difference at %d", len(got), len(frames), firstDiff(got, frames))
	}
}
