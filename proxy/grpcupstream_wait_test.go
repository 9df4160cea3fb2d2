package proxy

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// timeoutsSeen records the grpc-timeout of every call a peer gets.
type timeoutsSeen struct {
	mu   sync.Mutex
	vals []string
}

func (s *timeoutsSeen) all() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.vals...)
}

// echoTimeouts is an echo handler that notes each call's grpc-timeout.
func (s *timeoutsSeen) echo(st *h2Stream) {
	s.mu.Lock()
	s.vals = append(s.vals, st.Get("grpc-timeout"))
	s.mu.Unlock()
	echo(st)
}

// waitGRPCConn waits, up to 10 s, until cond holds for one of u's
// connections, and returns it.
func waitGRPCConn(t *testing.T, u *grpcUpstream, what string, cond func(c *grpcConn) bool) *grpcConn {
	t.Helper()
	var found *grpcConn
	waitFor(t, 10*time.Second, func() bool {
		for _, c := range grpcConns(u) {
			c.mu.Lock()
			ok := cond(c)
			c.mu.Unlock()
			if ok {
				found = c
				return true
			}
		}
		return false
	}, func() string { return "timed out waiting for " + what })
	return found
}

// waitGRPCDialWaiter waits, up to 10 s, until a call waits for the dial
// another call started on u.
func waitGRPCDialWaiter(t *testing.T, u *grpcUpstream) {
	t.Helper()
	waitFor(t, 10*time.Second, func() bool {
		u.mu.Lock()
		defer u.mu.Unlock()
		return u.dialing != nil && u.dialing.waiters > 0
	}, func() string { return "timed out waiting for a call to wait for the dial" })
}

// raiseStreams sends SETTINGS_MAX_CONCURRENT_STREAMS 100 on c.
func raiseStreams(t *testing.T, c *h2PeerConn) {
	t.Helper()
	err := c.write(func(fr *http2.Framer) error {
		return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 100})
	})
	if err != nil {
		t.Fatalf("writing SETTINGS: %v", err)
	}
}

// holdingRelay is a TCP relay to addr that holds each connection it
// accepts, unconnected, until release is closed: a Cells slow to answer
// the proxy's dial (its SETTINGS come late).
func holdingRelay(t *testing.T, addr string, accepted chan<- struct{}, release <-chan struct{}) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	done := make(chan struct{})
	t.Cleanup(func() {
		close(done)
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer in.Close()
				select {
				case accepted <- struct{}{}:
				case <-done:
					return
				}
				select {
				case <-release:
				case <-done:
					return
				}
				out, err := net.Dial("tcp", addr)
				if err != nil {
					return
				}
				defer out.Close()
				go func() {
					<-done
					in.Close()
					out.Close()
				}()
				go func() {
					io.Copy(out, in)
					out.(*net.TCPConn).CloseWrite()
				}()
				io.Copy(in, out)
			})
		}
	})
	return ln.Addr().String()
}

// TestGRPCUpstreamWaitTimeLeft: a call that waited in the proxy before
// its first attempt could leave (for Cells to allow a stream on its
// connection, SETTINGS_MAX_CONCURRENT_STREAMS 0 then raised; or for the
// connection to be dialled, Cells slow to send its SETTINGS) reaches
// Cells with the time left before its deadline as its grpc-timeout, not
// with the client's, which counts from when the client sent it: Cells
// would take the call for having more time than its client waits, and go
// on with work nobody takes. The client sends 30S and the test holds the
// call at least 1 s, so Cells must see at most 29.5 s. A call that did
// not wait keeps the client's value as it came.
func TestGRPCUpstreamWaitTimeLeft(t *testing.T) {
	t.Parallel()
	want := grpcMsg([]byte("time left"))
	const held = time.Second

	checkLeft := func(t *testing.T, got []string) {
		t.Helper()
		if len(got) != 1 {
			t.Fatalf("the upstream saw %d calls, want 1", len(got))
		}
		left, ok := parseGRPCTimeout(got[0])
		switch {
		case !ok:
			t.Errorf("grpc-timeout %q is not one (at most 8 digits and a unit)", got[0])
		case left <= 0 || left > 30*time.Second-held/2:
			t.Errorf("grpc-timeout %q (%v), want the time left after the call waited at least %v: above 0 and at most 29.5 s", got[0], left, held)
		}
	}

	t.Run("no wait", func(t *testing.T) {
		t.Parallel()
		var seen timeoutsSeen
		p := newH2Peer(t, h2PeerConfig{}, seen.echo)
		tp := startPeerProxy(t, p)
		checkOK(t, "first call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
		checkOK(t, "call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want, "grpc-timeout", "30S"), want)
		got := seen.all()
		if len(got) != 2 {
			t.Fatalf("the upstream saw %d calls, want 2", len(got))
		}
		if got[1] != "30S" {
			t.Errorf("grpc-timeout %q, want the client's \"30S\" as it came: the call went at once on an open connection", got[1])
		}
	})

	t.Run("stream limit", func(t *testing.T) {
		t.Parallel()
		var seen timeoutsSeen
		zero := h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 0}}}
		p := newH2Peer(t, zero, seen.echo)
		tp := startPeerProxy(t, p)
		res := make(chan grpcResult, 1)
		go func() { res <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want, "grpc-timeout", "30S") }()
		waitGRPCConn(t, tp.fwd.grpcUp, "the call to wait for Cells to allow a stream", func(c *grpcConn) bool { return c.waiting > 0 })
		time.Sleep(held) // a lower bound on the wait, not a bound on the proxy
		raiseStreams(t, p.Conns()[0])
		checkOK(t, "call", recv(t, res, "the call"), want)
		checkLeft(t, seen.all())
	})

	t.Run("dial", func(t *testing.T) {
		t.Parallel()
		var seen timeoutsSeen
		p := newH2Peer(t, h2PeerConfig{}, seen.echo)
		accepted, release := make(chan struct{}), make(chan struct{})
		relay := holdingRelay(t, p.Addr, accepted, release)
		cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
		cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: relay}
		tp := startProxy(t, cfg)
		res := make(chan grpcResult, 2)
		call := func() { res <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want, "grpc-timeout", "30S") }
		go call()
		recv(t, accepted, "the proxy's dial")
		// A second call, which waits for the first one's dial.
		go call()
		waitGRPCDialWaiter(t, tp.fwd.grpcUp)
		time.Sleep(held) // a lower bound on the wait, not a bound on the proxy
		close(release)
		checkOK(t, "call", recv(t, res, "the call"), want)
		checkOK(t, "call", recv(t, res, "the call"), want)
		got := seen.all()
		if len(got) != 2 {
			t.Fatalf("the upstream saw %d calls, want 2", len(got))
		}
		checkLeft(t, got[:1])
		checkLeft(t, got[1:])
	})
}

// TestGRPCUpstreamWaitPastDeadline: a call's deadline passes while it
// waits for Cells to allow a stream, before the proxy's own timer has
// ended the call (lateCtx). When Cells then lets it in, there is no time
// left to give Cells: the call is not sent, and its client gets
// DEADLINE_EXCEEDED.
func TestGRPCUpstreamWaitPastDeadline(t *testing.T) {
	t.Parallel()
	var seen timeoutsSeen
	zero := h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 0}}}
	p := newH2Peer(t, zero, seen.echo)
	tp := startPeerProxy(t, p)
	deadline := time.Now().Add(50 * time.Millisecond)
	req, err := grpcRequest(lateCtx{t.Context(), deadline}, "http://cells/pkg.Svc/Echo", grpcMsg([]byte("too late")))
	if err != nil {
		t.Fatal(err)
	}
	// As the proxy's HTTP/2 server hands a gRPC call over.
	req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/2.0", 2, 0
	req.ContentLength = -1
	req.Header.Set("Grpc-Timeout", "50m")
	type result struct {
		res *http.Response
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := tp.fwd.startGRPC(req)
		done <- result{res, err}
	}()
	waitGRPCConn(t, tp.fwd.grpcUp, "the call to wait for Cells to allow a stream", func(c *grpcConn) bool { return c.waiting > 0 })
	// Not a timing margin: the deadline is a fixed time, and lateCtx
	// never ends the call at it.
	time.Sleep(time.Until(deadline))
	raiseStreams(t, p.Conns()[0])
	r := recv(t, done, "the call")
	if r.err == nil {
		r.res.Body.Close()
		t.Fatal("the call was answered; want it ended at its deadline")
	}
	w := httptest.NewRecorder()
	tp.fwd.errorHandler(w, req, r.err)
	if got, want := w.Header().Get("Grpc-Status"), "4"; got != want {
		t.Errorf("grpc-status = %q (%q), want %q (DEADLINE_EXCEEDED)", got, w.Header().Get("Grpc-Message"), want)
	}
	if got := seen.all(); len(got) != 0 {
		t.Errorf("the upstream saw the call (grpc-timeout %q), want it not sent: no time was left", got)
	}
}

// TestGRPCUpstreamRefusedLimitLowered: Cells lowers its stream limit
// (SETTINGS_MAX_CONCURRENT_STREAMS 2, then 1) while a call is on its way,
// and refuses that call (REFUSED_STREAM), the one above its new limit: a
// server refuses a stream beyond the limit it announced (a grpc-go server,
// Cells, for no other reason: its operateHeaders), and the SETTINGS reach
// the proxy before the reset. The call is sent again, not on the
// connection that refused it, which the new limit fills, but on a new one;
// the client sees one successful call.
func TestGRPCUpstreamRefusedLimitLowered(t *testing.T) {
	t.Parallel()
	held, release := make(chan *h2Stream, 1), make(chan struct{})
	t.Cleanup(func() { close(release) })
	var mu sync.Mutex
	refused := 0
	p := newH2Peer(t, h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 2}}}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		if s.Get(":path") == "/pkg.Svc/Hold" {
			s.holdEcho(held, release, body)
			return
		}
		if s.c.N == 1 {
			mu.Lock()
			refused++
			mu.Unlock()
			s.c.write(func(fr *http2.Framer) error {
				return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1})
			})
			s.reset(http2.ErrCodeRefusedStream)
			return
		}
		s.respond(body)
	})
	tp := startPeerProxy(t, p)
	go callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Hold", grpcMsg(nil))
	recv(t, held, "the held call at the upstream")
	want := grpcMsg([]byte("refused once"))
	checkOK(t, "call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
	mu.Lock()
	defer mu.Unlock()
	if refused != 1 {
		t.Errorf("the first connection refused the call %d times, want once", refused)
	}
	if n := p.Accepted.Load(); n != 2 {
		t.Errorf("the upstream accepted %d connections, want 2 (the call sent again on a new one)", n)
	}
}
