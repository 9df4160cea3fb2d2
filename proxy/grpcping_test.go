package proxy

import (
	"testing"
	"time"
)

// startPingProxy is startPeerProxy with the proxy PINGing its gRPC
// upstream after every quiet period of every and giving up after timeout.
func startPingProxy(t *testing.T, p *h2Peer, every, timeout time.Duration) *testProxy {
	t.Helper()
	tp := startPeerProxy(t, p)
	tp.fwd.grpcUp.pingEvery, tp.fwd.grpcUp.pingTimeout = every, timeout
	return tp
}

// quietUntil answers a call's header, then says nothing until the proxy
// has sent pings PINGs on the connection (never, if pings is 0), and then
// ends the call with one message and grpc-status 0.
func quietUntil(pings int) func(s *h2Stream) {
	return func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		if s.wait(func() bool { return pings > 0 && s.c.rec.Pings >= pings }, 0, nil) != nil {
			return
		}
		if s.writeData(grpcMsg([]byte("ok")), false) == nil {
			s.writeHeaders(true, 1, "grpc-status", "0")
		}
	}
}

func pingsSeen(p *h2Peer) int {
	n := 0
	for _, c := range p.Conns() {
		n += c.Stats().Pings
	}
	return n
}

// TestGRPCUpstreamPingLost: a call whose upstream connection goes silent,
// PINGs included, ends with UNAVAILABLE instead of waiting for ever.
func TestGRPCUpstreamPingLost(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{SilentPings: true}, quietUntil(0))
	tp := startPingProxy(t, p, 100*time.Millisecond, 200*time.Millisecond)
	r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Watch", grpcMsg(nil))
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	if len(r.Body) != 0 {
		t.Errorf("body %q, want none", r.Body)
	}
	if got := r.Trailer.Get("Grpc-Status"); got != "14" {
		t.Errorf("grpc-status %q, want 14 (UNAVAILABLE); message %q", got, r.Trailer.Get("Grpc-Message"))
	}
	if pingsSeen(p) == 0 {
		t.Error("the upstream received no PING")
	}
}

// TestGRPCUpstreamPingAnswered: PINGs that are answered keep a quiet call
// open; it then ends normally.
func TestGRPCUpstreamPingAnswered(t *testing.T) {
	t.Parallel()
	const pings = 3
	p := newH2Peer(t, h2PeerConfig{}, quietUntil(pings))
	tp := startPingProxy(t, p, 50*time.Millisecond, 5*time.Second)
	r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Watch", grpcMsg(nil))
	checkOK(t, "quiet call", r, grpcMsg([]byte("ok")))
	if got := pingsSeen(p); got < pings {
		t.Errorf("upstream received %d PINGs, want at least %d", got, pings)
	}
}

// TestGRPCUpstreamNoPingWhenIdle: a connection without calls is not
// PINGed: grpc-go servers count such PINGs against the client and close
// the connection after three within two hours.
func TestGRPCUpstreamNoPingWhenIdle(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{}, quietUntil(1))
	tp := startPingProxy(t, p, 20*time.Millisecond, 5*time.Second)
	// The call's first PING ends it (a slow machine may let a second
	// one out before the answer arrives).
	checkOK(t, "quiet call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Watch", grpcMsg(nil)), grpcMsg([]byte("ok")))
	during := pingsSeen(p)
	// Not a timed assertion: a wait of 25 PING periods for PINGs that
	// must not come.
	time.Sleep(500 * time.Millisecond)
	if got := pingsSeen(p); got != during {
		t.Errorf("upstream received %d PINGs after the call ended, want none", got-during)
	}
}
