package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/url"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// upstreamStream returns the only call open on tp's gRPC upstream.
func upstreamStream(t *testing.T, tp *testProxy) *grpcStream {
	t.Helper()
	up := tp.Server.fwd.grpcUp
	var open *grpcStream
	waitFor(t, 10*time.Second, func() bool {
		for _, c := range grpcConns(up) {
			c.mu.Lock()
			for _, s := range c.streams {
				if s.res != nil {
					open = s
					break
				}
			}
			c.mu.Unlock()
			if open != nil {
				return true
			}
		}
		return false
	}, func() string { return "no call open on the gRPC upstream" })
	return open
}

// TestGRPCUpstreamSlowReaderBufferBounded: a long server stream whose client
// reads more slowly than Cells sends. Cells never exceeds the stream
// window the proxy grants, so the proxy must never hold more than about
// that much of the answer; the stream's buffer must not keep every byte
// read since it was last empty.
func TestGRPCUpstreamSlowReaderBufferBounded(t *testing.T) {
	t.Parallel()
	const total = 48 << 20
	p := newH2Peer(t, h2PeerConfig{ConnWindow: 1 << 30}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		buf := make([]byte, 64<<10)
		for sent := 0; sent < total; sent += len(buf) {
			if s.writeData(buf, false) != nil {
				return
			}
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)
	// A client that takes at most 64 KiB ahead of what it reads, so that
	// the proxy reads from Cells' side no faster than the client reads.
	cl := tp.client(true)
	cl.Transport.(*http.Transport).HTTP2 = &http.HTTP2Config{
		MaxReceiveBufferPerStream:     64 << 10,
		MaxReceiveBufferPerConnection: 64 << 10,
	}
	req, err := grpcRequest(testCtx(t), tp.URL+"/pkg.Svc/Download", grpcMsg(nil))
	if err != nil {
		t.Fatal(err)
	}
	res, err := cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	s := upstreamStream(t, tp)
	c := s.c
	maxCap := 0
	// The client reads 64 KiB at a time, each time once Cells has used
	// all the window the proxy gave back: a client slower than Cells.
	buf := make([]byte, 64<<10)
	var got int64
	for {
		for {
			c.mu.Lock()
			done := s.recv == 0 || s.remoteEnd || s.failed != nil
			maxCap = max(maxCap, s.buf.Cap())
			c.mu.Unlock()
			if done {
				break
			}
			time.Sleep(100 * time.Microsecond)
		}
		n, err := io.ReadFull(res.Body, buf)
		got += int64(n)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", got, err)
		}
	}
	if got != total {
		t.Fatalf("client received %d bytes, want %d", got, total)
	}
	t.Logf("largest buffer of the call: %.1f MiB", float64(maxCap)/(1<<20))
	if w := int(tp.fwd.grpcUp.streamWindow); maxCap > 3*w {
		t.Errorf("the call's response buffer grew to %d bytes for a %d-byte window: it keeps bytes already read", maxCap, w)
	}
}

// TestGRPCUpstreamStreamIDsExhausted: a connection that has used the last stream
// ID (2^31-1) takes no call any more; once its calls are over it must be
// closed (as x/net's transport and grpc-go's client do), not left open
// forever in the pool with its socket and read goroutine. The test moves
// the connection's next stream ID close to the end instead of making a
// billion calls.
func TestGRPCUpstreamStreamIDsExhausted(t *testing.T) {
	t.Parallel()
	p, tp, want, c := startEchoPeer(t, "hello")
	c.mu.Lock()
	c.nextID = h2MaxStreamID // the last stream ID a client may use
	c.mu.Unlock()
	checkOK(t, "call on the last stream ID", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
	checkOK(t, "call after it", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
	if n := p.Accepted.Load(); n != 2 {
		t.Fatalf("upstream accepted %d connections, want 2", n)
	}
	waitPeerClosed(t, p.Conns()[0], "the connection out of stream IDs, with no call left on it,")
}

// TestGRPCUpstreamGoAwayWhileWaitingForStreams: a call waits on a connection
// where Cells allows no stream (SETTINGS_MAX_CONCURRENT_STREAMS 0); Cells
// then sends GOAWAY (a restart). The call never left the proxy, so, like
// any call that finds the pool going away, it must go on a new connection
// rather than fail with UNAVAILABLE.
func TestGRPCUpstreamGoAwayWhileWaitingForStreams(t *testing.T) {
	t.Parallel()
	p, tp, want, c := startEchoPeer(t, "hello")
	pc := p.Conns()[0]
	pc.write(func(fr *http2.Framer) error {
		return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0})
	})
	// waitConn waits until cond holds of c, under c's lock.
	waitConn := func(what string, cond func() bool) {
		t.Helper()
		waitFor(t, 10*time.Second, func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			return cond()
		}, func() string { return "timed out waiting for " + what })
	}
	waitConn("the proxy to apply SETTINGS_MAX_CONCURRENT_STREAMS 0", func() bool { return c.maxStreams == 0 })
	res := make(chan grpcResult, 1)
	go func() { res <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want) }()
	waitConn("the call to wait for streams", func() bool { return c.changed != nil })
	pc.goAway(1, http2.ErrCodeNo)
	r := recv(t, res, "the second call")
	checkOK(t, "call waiting when GOAWAY came", r, want)
	t.Logf("grpc-status %q, grpc-message %q; connections accepted: %d", r.Header.Get("Grpc-Status"), r.Header.Get("Grpc-Message"), p.Accepted.Load())
}

// startEchoPeer starts a proxy in front of a scripted Cells that echoes,
// makes one call with msg through it, and returns the message as sent and
// the proxy's connection to Cells that carried it.
func startEchoPeer(t *testing.T, msg string) (*h2Peer, *testProxy, []byte, *grpcConn) {
	t.Helper()
	p := newH2Peer(t, h2PeerConfig{}, echo)
	tp := startPeerProxy(t, p)
	want := grpcMsg([]byte(msg))
	checkOK(t, "first call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
	return p, tp, want, grpcConns(tp.Server.fwd.grpcUp)[0]
}

// TestGRPCUpstreamUnreadPingsBounded: a Cells connection that stops reading
// but keeps sending PINGs. The proxy's read loop answers each one without
// waiting for its writer, which is stuck on the unread connection; the
// answers must not pile up without end (x/net's server closes a client
// that does this after 10,000 queued control frames). The proxy must close
// the connection, and the call on it must end, long before the peer has
// sent 500,000 PINGs.
func TestGRPCUpstreamUnreadPingsBounded(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	const maxPings = 500_000
	type flood struct {
		sent int
		err  error
	}
	flooded := make(chan flood, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			flooded <- flood{err: err}
			return
		}
		defer nc.Close()
		// Nothing is ever read: the proxy's preface, its SETTINGS and
		// the call's DATA stay in the socket buffers, until the
		// proxy's writes block.
		nc.SetWriteDeadline(time.Now().Add(time.Minute))
		bw := bufio.NewWriterSize(nc, 64<<10)
		fr := http2.NewFramer(bw, nil)
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
		fr.WriteWindowUpdate(0, 1<<31-1-65535)
		for i := range maxPings {
			fr.WritePing(false, [8]byte{byte(i >> 8), byte(i)})
			if i%1024 == 1023 {
				if err := bw.Flush(); err != nil {
					flooded <- flood{sent: i, err: err}
					return
				}
			}
		}
		flooded <- flood{sent: maxPings, err: bw.Flush()}
	}()
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
	tp := startProxy(t, cfg)
	// A 16 MiB request body, so that the proxy's writes to the peer
	// block well before the PINGs end.
	res := make(chan grpcResult, 1)
	go func() { res <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Upload", grpcMsg(make([]byte, 16<<20))) }()
	f := recv(t, flooded, "the peer's PINGs")
	if f.err == nil {
		t.Fatalf("the proxy read all %d PINGs from a connection it could not write to, and kept it open", f.sent)
	}
	t.Logf("the proxy closed the connection after about %d PINGs: %v", f.sent, f.err)
	r := recv(t, res, "the call")
	got := r.Trailer.Get("Grpc-Status")
	if got == "" {
		got = r.Header.Get("Grpc-Status") // a Trailers-Only answer
	}
	if got != "14" {
		t.Errorf("call on the closed connection: grpc-status %q (HTTP %d, %v), want 14 (UNAVAILABLE)", got, r.Status, r.Err)
	}
}
