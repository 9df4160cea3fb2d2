package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// Tests of the gRPC upstream's writer goroutine (grpcConn.writeLoop).

// deafPeer is a Cells gRPC port that announces settings (and, when
// connWindow is above 65,535, that connection window), then never reads
// anything on the connections it accepts. It closes them when the test
// ends.
func deafPeer(t *testing.T, connWindow uint32, settings ...http2.Setting) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, nc)
			mu.Unlock()
			fr := http2.NewFramer(nc, nil)
			fr.WriteSettings(settings...)
			if connWindow > defaultWindow {
				fr.WriteWindowUpdate(0, connWindow-defaultWindow)
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, nc := range conns {
			nc.Close()
		}
	})
	return ln.Addr().String()
}

// zeroUpload is a request body of total zero bytes that counts what was
// read from it; once closed, reads fail.
type zeroUpload struct {
	total  int64
	read   atomic.Int64
	closed atomic.Bool
}

func (b *zeroUpload) Read(p []byte) (int, error) {
	if b.closed.Load() {
		return 0, net.ErrClosed
	}
	left := b.total - b.read.Load()
	if left <= 0 {
		return 0, errors.New("zeroUpload: read past its end") // the call never ends here
	}
	n := int(min(int64(len(p)), left))
	clear(p[:n])
	b.read.Add(int64(n))
	return n, nil
}

func (b *zeroUpload) Close() error {
	b.closed.Store(true)
	return nil
}

// startUpload starts a streaming call with body on u, in the background; it
// returns a channel for do's error.
func startUpload(t *testing.T, u *grpcUpstream, body *zeroUpload) <-chan error {
	t.Helper()
	req, err := http.NewRequestWithContext(context.Background(), "POST", "http://cells/pkg.Svc/Upload", body)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = -1
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	errc := make(chan error, 1)
	go func() {
		res, err := u.do(&grpcCall{req: req, host: "cells", path: "/pkg.Svc/Upload"})
		if res != nil {
			res.Body.Close()
		}
		errc <- err
	}()
	return errc
}

// waitStalled waits until n stops growing for a second, or reaches limit,
// for at most 30 s; it returns n's last value.
func waitStalled(n *atomic.Int64, limit int64) int64 {
	last, since := n.Load(), time.Now()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		v := n.Load()
		if v >= limit {
			return v
		}
		if v != last {
			last, since = v, time.Now()
		} else if time.Since(since) >= time.Second {
			return v
		}
	}
	return n.Load()
}

// TestGRPCUpstreamUploadBackpressure: a Cells that grants large windows (as a
// grpc-go server's BDP estimation does, up to 16 MiB a stream, or any value
// a misbehaving one announces) and then stops reading. Before the writer
// goroutine, the call's copy made the write(2) itself and blocked in it
// once the socket buffers were full, so the proxy read no more of the
// client's upload. With the writer, the copy only queues: it must still
// stop when the writer cannot keep up, not move the whole window of the
// client's upload into the proxy's write buffer.
func TestGRPCUpstreamUploadBackpressure(t *testing.T) {
	t.Parallel()
	const window = 1<<31 - 1
	addr := deafPeer(t, window, http2.Setting{ID: http2.SettingInitialWindowSize, Val: window})
	u := newGRPCUpstream(addr, nil, &net.Dialer{})
	const total = 64 << 20
	body := &zeroUpload{total: total}
	errc := startUpload(t, u, body)
	got := waitStalled(&body.read, total)
	u.Close()
	recv(t, errc, "the call to end after Close")
	t.Logf("the proxy took %.1f MiB of the client's upload to a Cells that reads nothing", float64(got)/(1<<20))
	// The socket buffers on 127.0.0.1 hold a few MiB (tcp_wmem's 4 MiB
	// at most, plus the peer's receive buffer).
	if got > 32<<20 {
		t.Errorf("the proxy read %d bytes of the upload into memory for a Cells that reads nothing: no backpressure", got)
	}
}

// TestGRPCBrokenUploadUnavailable: a client-streaming call (an upload)
// whose client has sent a message and is preparing the next; Cells drops
// the connection before answering. The call did not fail on the client's
// side: its client must get UNAVAILABLE (14), which gRPC clients may retry,
// not INTERNAL (13) "malformed or incomplete request body". The stream
// closes the client's body when the connection fails (closeBody), and the
// copy's read that this ends is no fault of the client's. Several calls,
// as the copy's failed read races the handler's answer.
func TestGRPCBrokenUploadUnavailable(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.read(); err != nil {
			return
		}
		s.c.close() // a crash, with the call open
	})
	tp := startPeerProxy(t, p)
	for i := range 50 {
		pr, pw := io.Pipe()
		req, err := http.NewRequestWithContext(testCtx(t), "POST", tp.URL+"/pkg.Svc/Upload", pr)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("Te", "trailers")
		go pw.Write(grpcMsg([]byte("first")))
		res, err := tp.H2.Do(req)
		if err != nil {
			pw.Close()
			t.Fatalf("call %d: %v", i, err)
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		pw.Close()
		got := res.Header.Get("Grpc-Status")
		if got == "" {
			got = res.Trailer.Get("Grpc-Status")
		}
		if got != "14" {
			t.Fatalf("call %d: grpc-status %q (%q), want 14 (UNAVAILABLE): Cells broke, not the client's body",
				i, got, res.Header.Get("Grpc-Message")+res.Trailer.Get("Grpc-Message"))
		}
	}
}
