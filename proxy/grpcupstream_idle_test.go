package proxy

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestGRPCUpstreamIdleClosed: a connection to Cells that carried no call
// for the idle timeout (shortened here) is closed, with GOAWAY NO_ERROR
// first, and the next call dials a new one; a connection with a call open
// is not idle, however long the call stays quiet (Cells Sync's
// StreamChanges stays open for hours), and is closed only once the call
// has ended and the timeout passed again. Before, a connection stayed
// open for good once dialled.
func TestGRPCUpstreamIdleClosed(t *testing.T) {
	t.Parallel()
	const idle = 20 * time.Millisecond

	t.Run("idle", func(t *testing.T) {
		t.Parallel()
		p := newH2Peer(t, h2PeerConfig{}, echo)
		tp := startPeerProxy(t, p)
		tp.fwd.grpcUp.idleTimeout = idle
		want := grpcMsg([]byte("before"))
		checkOK(t, "call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
		pc := p.Conns()[0]
		waitPeerClosed(t, pc, "the connection that carried no call for the idle timeout")
		if got, want := pc.Stats().GoAways, []http2.ErrCode{http2.ErrCodeNo}; len(got) != 1 || got[0] != want[0] {
			t.Errorf("the upstream got GOAWAY %v before the close, want %v", got, want)
		}
		want = grpcMsg([]byte("after"))
		checkOK(t, "call after the close", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
		if n := p.Accepted.Load(); n != 2 {
			t.Errorf("the upstream accepted %d connections, want 2 (the call after the close on a new one)", n)
		}
	})

	t.Run("call open", func(t *testing.T) {
		t.Parallel()
		held, release := make(chan *h2Stream, 1), make(chan struct{})
		p := newHoldingPeer(t, "/pkg.Svc/Watch", held, release)
		tp := startPeerProxy(t, p)
		tp.fwd.grpcUp.idleTimeout = idle
		want := grpcMsg([]byte("watching"))
		res := make(chan grpcResult, 1)
		go func() { res <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Watch", want) }()
		recv(t, held, "the call at the upstream")
		// Many idle timeouts with the call open and nothing moving. A
		// loaded machine runs fewer checks, which cannot fail the test.
		time.Sleep(25 * idle)
		pc := p.Conns()[0]
		pc.mu.Lock()
		closed := pc.closed
		pc.mu.Unlock()
		if closed || len(pc.Stats().GoAways) > 0 {
			t.Fatalf("the connection was closed (GOAWAY %v) with a call open on it", pc.Stats().GoAways)
		}
		close(release)
		checkOK(t, "the long call", recv(t, res, "the long call"), want)
		waitPeerClosed(t, pc, "the connection once its call ended")
		if n := p.Accepted.Load(); n != 1 {
			t.Errorf("the upstream accepted %d connections, want 1", n)
		}
	})
}

// TestGRPCUpstreamIdleClosedWhilePicked: a call picks a connection to
// Cells that takes no stream (Cells lowered its limit to 0, then its calls
// ended) to wait on it, and the idle check closes that connection before
// the call counts itself as waiting (c.waiting). The call was never sent:
// it must go on another connection, as one that finds its picked
// connection closed when it opens its stream does (errH2Full), and not
// reach its client as UNAVAILABLE (errH2Idle). The hook runs the check
// exactly in that window.
func TestGRPCUpstreamIdleClosedWhilePicked(t *testing.T) {
	t.Parallel()
	p, tp, want, c := startEchoPeer(t, "hello")
	pc := p.Conns()[0]
	pc.write(func(fr *http2.Framer) error {
		return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0})
	})
	up := tp.Server.fwd.grpcUp
	waitNoneTakes(t, up)
	up.mu.Lock()
	up.pickedNone = func(picked *grpcConn) {
		if picked != c {
			t.Errorf("the call picked %p to wait on, want the connection that takes none, %p", picked, c)
		}
		// Two checks: the first notes the call before, the second
		// finds nothing since.
		c.idleCheck()
		c.idleCheck()
	}
	up.mu.Unlock()
	checkOK(t, "call that picked the connection the idle check closed", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
	waitPeerClosed(t, pc, "the connection the idle check closed")
	if got := pc.Stats().GoAways; len(got) != 1 || got[0] != http2.ErrCodeNo {
		t.Errorf("the first connection got GOAWAY %v, want [NO_ERROR] from the idle check", got)
	}
	if n := p.Accepted.Load(); n != 2 {
		t.Errorf("the upstream accepted %d connections, want 2 (the call on a new one)", n)
	}
}
