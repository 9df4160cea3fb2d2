package proxy

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// TLS session resumption on both sides of the proxy. A full handshake costs
// the proxy a certificate signature (public side) or a chain verification
// (Cells' side) and a key exchange; a resumed one skips the certificate
// work. Browsers and Cells Sync resume when they reconnect, and the proxy
// opens a connection to Cells for every websocket and whenever Cells has
// closed a pooled one.

// TestTLSResumptionPublic: a client that reconnects with the session it was
// given resumes, on HTTP/1.1, on HTTP/2 and on the dedicated gRPC port, in
// TLS 1.3 and TLS 1.2.
func TestTLSResumptionPublic(t *testing.T) {
	e := startGRPC(t, topoTLS, nil)
	ports := map[string]string{"main": e.tp.Addr().String(), "grpc": e.tp.GRPCAddr().String()}
	for _, name := range []string{"main", "grpc"} {
		for _, alpn := range []string{"h2", "http/1.1"} {
			if name == "grpc" && alpn == "http/1.1" {
				continue
			}
			for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
				t.Run(name+"/"+alpn+"/"+tls.VersionName(v), func(t *testing.T) {
					conf := e.tp.TLSConfig(alpn)
					conf.MaxVersion = v
					conf.ClientSessionCache = tls.NewLRUClientSessionCache(4)
					for i, want := range []bool{false, true, true} {
						c, err := tls.Dial("tcp", ports[name], conf)
						if err != nil {
							t.Fatalf("dial %d: %v", i, err)
						}
						// A TLS 1.3 ticket arrives after the handshake:
						// read until the server has sent it, as a client
						// does when it reads its first response.
						if v == tls.VersionTLS13 {
							readTicket(t, c, alpn)
						}
						st := c.ConnectionState()
						c.Close()
						if st.DidResume != want {
							t.Errorf("connection %d: resumed %v, want %v", i, st.DidResume, want)
						}
						if st.NegotiatedProtocol != alpn {
							t.Errorf("connection %d: ALPN %q, want %q", i, st.NegotiatedProtocol, alpn)
						}
					}
				})
			}
		}
	}
}

// readTicket makes the client read from c until the server's first bytes
// (and with them any session ticket sent after the handshake) are in: the
// server's SETTINGS for h2, a response for HTTP/1.1.
func readTicket(t *testing.T, c *tls.Conn, alpn string) {
	t.Helper()
	if alpn == "http/1.1" {
		if _, err := c.Write([]byte("GET /ticket HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
	} else if _, err := c.Write([]byte(http2Preface + "\x00\x00\x00\x04\x00\x00\x00\x00\x00")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
}

const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// resumeUpstream is a TLS Cells that records, for each request, whether
// the connection it came on was resumed, and can drop all its connections
// while it keeps listening, as Cells closing idle connections does.
type resumeUpstream struct {
	*testUpstream
	mu      sync.Mutex
	resumed map[string][]bool // by path (gRPC: "grpc")
	conns   connSet
}

func newResumeUpstream(t *testing.T, v uint16) *resumeUpstream {
	u := &resumeUpstream{resumed: map[string][]bool{}}
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, newProbeService())
	t.Cleanup(gs.Stop)
	u.testUpstream = newUpstreamWith(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.URL.Path
		if strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			key = "grpc"
		}
		u.mu.Lock()
		u.resumed[key] = append(u.resumed[key], r.TLS.DidResume)
		u.mu.Unlock()
		switch {
		case key == "grpc":
			gs.ServeHTTP(w, r)
		case strings.HasPrefix(key, "/ws"):
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			wsEcho(r.Context(), c)
		default:
			w.Header().Set("Connection", "close")
		}
	}), func(srv *http.Server) {
		srv.TLSConfig.MaxVersion = v
		srv.ConnState = u.conns.track
	})
	return u
}

// drop closes every connection to the upstream.
func (u *resumeUpstream) drop() { u.conns.closeAll() }

func (u *resumeUpstream) seen(key string) []bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]bool(nil), u.resumed[key]...)
}

// TestTLSResumptionUpstream: when the proxy opens a new connection to
// Cells it resumes the session of an earlier one: after Cells has closed a
// pooled HTTP/1.1 connection, for every websocket, and when a gRPC
// connection is replaced.
func TestTLSResumptionUpstream(t *testing.T) {
	for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		t.Run(tls.VersionName(v), func(t *testing.T) {
			up := newResumeUpstream(t, v)
			want := []bool{false, true, true}
			// A proxy for each part: its first connection to Cells has no
			// session to resume.
			tp := startProxy(t, testConfig(up.testUpstream))
			// Cells answers Connection: close, so every request dials.
			for range want {
				res := getWith(t, tp.H1, tp.URL+"/a/close", nil)
				res.Body.Close()
			}
			if got := up.seen("/a/close"); !slices.Equal(got, want) {
				t.Errorf("HTTP/1.1 after Cells closed: resumed %v, want %v", got, want)
			}

			tp = startProxy(t, testConfig(up.testUpstream))
			for range want {
				c, _ := dialWS(t, tp, "/ws/event", nil)
				ctx := testCtx(t)
				if err := c.Write(ctx, websocket.MessageText, []byte("hi")); err != nil {
					t.Fatal(err)
				}
				if _, _, err := c.Read(ctx); err != nil {
					t.Fatal(err)
				}
				c.Close(websocket.StatusNormalClosure, "")
			}
			if got := up.seen("/ws/event"); !slices.Equal(got, want) {
				t.Errorf("websockets: resumed %v, want %v", got, want)
			}

			tp = startProxy(t, testConfig(up.testUpstream))
			tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
			for range want {
				if _, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{}, grpc.WaitForReady(true)); err != nil {
					t.Fatal(err)
				}
				up.drop()
				// A call sent while the close is on its way fails (Cells
				// may have read it: it is not sent again); a client would
				// retry. Wait until the proxy has seen the close.
				waitGRPCConns(t, tp, 0)
			}
			if got := up.seen("grpc"); !slices.Equal(got, want) {
				t.Errorf("gRPC after Cells dropped the connection: resumed %v, want %v", got, want)
			}
		})
	}
}

// waitGRPCConns waits until the proxy holds n connections to Cells' gRPC
// side.
func waitGRPCConns(t *testing.T, tp *testProxy, n int) {
	t.Helper()
	var got int
	waitFor(t, 10*time.Second, func() bool { got = len(grpcConns(tp.fwd.grpcUp)); return got == n }, func() string {
		return fmt.Sprintf("proxy holds %d gRPC connections to Cells, want %d", got, n)
	})
}

// connSet is the connections a test server has open, kept by its
// ConnState hook (track), so that the test can drop them all as a Cells
// closing its connections does.
type connSet struct {
	mu sync.Mutex
	m  map[net.Conn]bool
}

func (s *connSet) track(c net.Conn, st http.ConnState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch st {
	case http.StateNew:
		if s.m == nil {
			s.m = map[net.Conn]bool{}
		}
		s.m[c] = true
	case http.StateClosed, http.StateHijacked:
		delete(s.m, c)
	}
}

// closeAll closes every connection open.
func (s *connSet) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.m {
		c.Close()
	}
}
