package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// testCA is a root that issues Cells' certificates, as Cells' own
// certs/rootCA.pem or an internal CA does.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

var testSerial atomic.Int64

func newTestCA(t testing.TB, cn string) *testCA {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(testSerial.Add(1)), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	return &testCA{cert: signCert(t, tmpl, tmpl, &k.PublicKey, k), key: k}
}

// PEM is the root as CELLS_UPSTREAM_CA_FILE holds it.
func (ca *testCA) PEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
}

// issue is a server certificate from ca for the DNS names and 127.0.0.1
// (when ip).
func (ca *testCA) issue(t testing.TB, ip bool, names ...string) *tls.Certificate {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(testSerial.Add(1)), Subject: pkix.Name{CommonName: "cells"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: names,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	if ip {
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	leaf := signCert(t, tmpl, ca.cert, &k.PublicKey, ca.key)
	return &tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: k, Leaf: leaf}
}

// caCells is a Cells on TLS whose certificate a test swaps (new handshakes
// get it) and whose connections it can drop, so that the proxy makes new
// ones. It answers HTTP with "ok", websocket upgrades with an echo, and
// gRPC with the interop service, on one port as Cells does.
type caCells struct {
	*testUpstream
	cert    atomic.Pointer[tls.Certificate]
	resumed atomic.Int64 // requests that came over a resumed TLS session
	// tickets counts the session tickets Cells took back from the
	// proxy, each to resume a session: counted before Cells answers
	// the handshake, so before the proxy can accept or refuse it.
	tickets atomic.Int64

	conns connSet
}

func newCACells(t *testing.T, cert *tls.Certificate) *caCells {
	t.Helper()
	return newCACellsUpTo(t, cert, 0)
}

// newCACellsUpTo is a caCells that speaks TLS up to maxVersion (0: 1.3).
func newCACellsUpTo(t *testing.T, cert *tls.Certificate, maxVersion uint16) *caCells {
	t.Helper()
	return newCACellsServing(t, cert, maxVersion, nil)
}

// newCACellsServing is a caCells whose answers but gRPC's are h's (nil:
// "ok", and one message echoed on a websocket).
func newCACellsServing(t *testing.T, cert *tls.Certificate, maxVersion uint16, other http.Handler) *caCells {
	t.Helper()
	c := &caCells{}
	c.cert.Store(cert)
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, newProbeService())
	t.Cleanup(gs.Stop)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && r.TLS.DidResume {
			c.resumed.Add(1)
		}
		switch {
		case r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc"):
			gs.ServeHTTP(w, r)
		case other != nil:
			other.ServeHTTP(w, r)
		case r.Header.Get("Upgrade") != "":
			ws, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer ws.CloseNow()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			typ, msg, err := ws.Read(ctx)
			if err != nil {
				return
			}
			ws.Write(ctx, typ, msg)
			ws.Close(websocket.StatusNormalClosure, "")
		default:
			io.WriteString(w, "ok")
		}
	})
	c.testUpstream = newUpstreamWith(t, upTLS, h, func(s *http.Server) {
		s.TLSConfig.Certificates = nil
		s.TLSConfig.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.cert.Load(), nil }
		s.TLSConfig.MaxVersion = maxVersion
		conf := s.TLSConfig
		conf.UnwrapSession = func(ticket []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
			ss, err := conf.DecryptTicket(ticket, cs)
			if ss != nil {
				c.tickets.Add(1)
			}
			return ss, err
		}
		s.ConnState = c.conns.track
	})
	return c
}

// serve makes new handshakes get cert, and drops every connection open:
// the proxy's next requests need new ones. The session tickets issued
// before are refused from now on, as a restarted Cells refuses them,
// unless keepTickets: a resumed session has the certificate of its first
// handshake.
func (c *caCells) serve(t *testing.T, cert *tls.Certificate, keepTickets bool) {
	t.Helper()
	if !keepTickets {
		var key [32]byte
		rand.Read(key[:])
		c.Srv.TLSConfig.SetSessionTicketKeys([][32]byte{key})
	}
	c.cert.Store(cert)
	c.conns.closeAll()
}

// caProxy is a proxy in front of a caCells, trusting caFile.
type caProxy struct {
	*testProxy
	cells  *caCells
	caFile string
}

func startCAProxy(t *testing.T, cells *caCells, ca []byte) *caProxy {
	t.Helper()
	caFile := filepath.Join(t.TempDir(), "rootCA.pem")
	if err := os.WriteFile(caFile, ca, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(cells.testUpstream)
	cfg.UpstreamCAFile = caFile
	return &caProxy{testProxy: startProxy(t, cfg), cells: cells, caFile: caFile}
}

// waitNoGRPCConns waits until the proxy has noticed that Cells dropped its
// gRPC connections: a call sent on one it has not yet would fail for that,
// not for the certificate.
func (p *caProxy) waitNoGRPCConns(t *testing.T) {
	t.Helper()
	waitGRPCConns(t, p.testProxy, 0)
}

// newConns has Cells, restarted, serve cert from now on, on connections
// the proxy makes after this.
func (p *caProxy) newConns(t *testing.T, cert *tls.Certificate) {
	t.Helper()
	p.cells.serve(t, cert, false)
	p.waitNoGRPCConns(t)
}

// check sends one request of each kind that reaches Cells: HTTP/1.1 and
// HTTP/2 from the client, a websocket, a gRPC call; each must succeed
// (ok) or fail as an untrusted upstream does.
func (p *caProxy) check(t *testing.T, ok bool, when string) {
	t.Helper()
	want := http.StatusOK
	if !ok {
		want = http.StatusBadGateway
	}
	for name, c := range map[string]*http.Client{"HTTP/1.1": p.H1, "HTTP/2": p.H2} {
		res, err := c.Get(p.URL + "/a/frontend/bootconf")
		if err != nil {
			t.Fatalf("%s: GET over %s: %v", when, name, err)
		}
		res.Body.Close()
		if got := res.StatusCode; got != want {
			t.Errorf("%s: GET over %s: %d, want %d", when, name, got, want)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, res, err := websocket.Dial(ctx, "wss://"+p.Addr().String()+"/ws/event", &websocket.DialOptions{HTTPClient: p.H1})
	switch {
	case ok && err != nil:
		t.Errorf("%s: websocket: %v", when, err)
	case ok:
		if err := ws.Write(ctx, websocket.MessageText, []byte("ping")); err != nil {
			t.Errorf("%s: websocket write: %v", when, err)
		} else if _, msg, err := ws.Read(ctx); err != nil || string(msg) != "ping" {
			t.Errorf("%s: websocket echo: %q, %v; want ping", when, msg, err)
		}
		ws.CloseNow()
	case err == nil:
		ws.CloseNow()
		t.Errorf("%s: websocket opened, want it refused", when)
	case res == nil || res.StatusCode != http.StatusBadGateway:
		t.Errorf("%s: websocket: %v, want a 502", when, err)
	}

	cc := newGRPCClient(t, p.testProxy, p.Addr().String())
	defer cc.Close()
	_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{})
	switch {
	case ok && err != nil:
		t.Errorf("%s: gRPC call: %v", when, err)
	case !ok && err == nil:
		t.Errorf("%s: gRPC call succeeded, want it refused", when)
	}
}

// untrusted is how many times the log says Cells' certificate was not
// trusted.
func (p *caProxy) untrusted() int {
	return strings.Count(p.Log.String(), "upstream certificate not trusted: set CELLS_UPSTREAM_CA_FILE")
}

// replaceFile writes data to file as an operator or a tool would: in place
// (truncated, then written), or into a new file renamed over it.
func replaceFile(t *testing.T, file string, data []byte, atomically bool) {
	t.Helper()
	if !atomically {
		if err := os.WriteFile(file, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return
	}
	tmp := file + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, file); err != nil {
		t.Fatal(err)
	}
}

// TestUpstreamCAReload: Cells' certificate is re-issued by another CA, and
// the file CELLS_UPSTREAM_CA_FILE names is replaced with that CA. Until the
// file changes, new connections to Cells are refused (502) on every path
// (HTTP/1.1, HTTP/2 client, websocket, gRPC); once it has, without a
// restart, they all succeed. Hostnames are still checked with the new CA.
func TestUpstreamCAReload(t *testing.T) {
	setCertPollInterval(t, time.Hour) // the test drives the checks
	ca1, ca2 := newTestCA(t, "cells root 1"), newTestCA(t, "cells root 2")
	for _, atomically := range []bool{true, false} {
		name := "in place"
		if atomically {
			name = "renamed"
		}
		t.Run(name, func(t *testing.T) {
			cells := newCACells(t, ca1.issue(t, true, "localhost"))
			p := startCAProxy(t, cells, ca1.PEM())
			p.check(t, true, "Cells' certificate from the CA in the file")
			p.newConns(t, ca2.issue(t, true, "localhost"))
			p.check(t, false, "Cells' certificate from a CA not in the file")
			if p.untrusted() == 0 {
				t.Errorf("no log line says Cells' certificate is not trusted:\n%s", p.Log)
			}
			p.fwd.ca.poll()
			p.check(t, false, "the file unchanged, polled")

			replaceFile(t, p.caFile, ca2.PEM(), atomically)
			p.fwd.ca.poll()
			p.check(t, true, "the file replaced with the new CA")
			if got, want := strings.Count(p.Log.String(), "CELLS_UPSTREAM_CA_FILE reloaded"), 1; got != want {
				t.Errorf("%d lines say CELLS_UPSTREAM_CA_FILE was reloaded, want %d:\n%s", got, want, p.Log)
			}

			// The name is still verified.
			p.newConns(t, ca2.issue(t, false, "files.example.com"))
			before := p.untrusted()
			p.check(t, false, "a certificate from the new CA for another name")
			if p.untrusted() == before {
				t.Errorf("no log line says Cells' certificate is not trusted:\n%s", p.Log)
			}
			p.newConns(t, ca2.issue(t, true, "localhost"))
			p.check(t, true, "a certificate from the new CA for the name")
		})
	}
}

// TestUpstreamCAWrittenInParts: a poll that catches the CA file between
// two writes of its writer (cat other-root.pem cells-root.pem >
// rootCA.pem) reads a bundle that loads but lacks Cells' root. It must not
// be used: the pool read before keeps verifying Cells, and the next poll
// takes the whole bundle.
func TestUpstreamCAWrittenInParts(t *testing.T) {
	setCertPollInterval(t, time.Hour) // the test drives the checks
	ca, other := newTestCA(t, "cells root"), newTestCA(t, "another root")
	cells := newCACells(t, ca.issue(t, true, "localhost"))
	p := startCAProxy(t, cells, ca.PEM())
	p.check(t, true, "before the rewrite")

	// The first write; the second comes while the poll reads.
	replaceFile(t, p.caFile, other.PEM(), false)
	testHookSettle = func() {
		replaceFile(t, p.caFile, append(other.PEM(), ca.PEM()...), false)
	}
	t.Cleanup(func() { testHookSettle = nil })
	p.fwd.ca.poll()
	if got := p.fwd.ca.generation(); got != 0 {
		t.Errorf("after a poll that read the bundle half written, pool %d in use, want the first (0)", got)
	}
	p.check(t, true, "after a poll that read the bundle half written")

	testHookSettle = nil
	p.fwd.ca.poll()
	if got := p.fwd.ca.generation(); got != 1 {
		t.Errorf("after the next poll, pool %d in use, want the whole bundle's (1)", got)
	}
	p.check(t, true, "after the next poll")
}

// TestUpstreamCAReloadWatched: the proxy polls the file by itself.
func TestUpstreamCAReloadWatched(t *testing.T) {
	setCertPollInterval(t, 5*time.Millisecond)
	ca1, ca2 := newTestCA(t, "cells root 1"), newTestCA(t, "cells root 2")
	cells := newCACells(t, ca1.issue(t, true, "localhost"))
	p := startCAProxy(t, cells, ca1.PEM())
	p.check(t, true, "Cells' certificate from the CA in the file")
	p.newConns(t, ca2.issue(t, true, "localhost"))
	replaceFile(t, p.caFile, ca2.PEM(), true)
	waitFor(t, 20*time.Second, func() bool { return strings.Contains(p.Log.String(), "CELLS_UPSTREAM_CA_FILE reloaded") }, func() string {
		return fmt.Sprintf("CELLS_UPSTREAM_CA_FILE not reloaded 20s after it changed:\n%s", p.Log)
	})
	p.check(t, true, "the file replaced with the new CA")
}

// TestUpstreamCABadFile: a CA file that does not load leaves the CA read
// before in use, with one warning naming CELLS_UPSTREAM_CA_FILE however
// many polls find it; SIGHUP (Reload) returns the error. A good file then
// is taken.
func TestUpstreamCABadFile(t *testing.T) {
	setCertPollInterval(t, time.Hour)
	ca1, ca2 := newTestCA(t, "cells root 1"), newTestCA(t, "cells root 2")
	both := append(ca1.PEM(), ca2.PEM()...)
	for _, tc := range []struct {
		name string
		data []byte // nil: the file removed
		want string // in the warning
	}{
		{"removed", nil, "no such file"},
		{"empty", []byte{}, "no PEM certificate"},
		{"garbage", []byte("not a certificate\n"), "no PEM certificate"},
		{"not base64", []byte("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"), "no PEM certificate"},
		{"a key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2, 3}}), "no PEM certificate"},
		// A bundle rewritten in place, caught after its first CA: the
		// second would be lost.
		{"half-written bundle", both[:len(ca1.PEM())+len(ca2.PEM())/2], "unfinished"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cells := newCACells(t, ca1.issue(t, true, "localhost"))
			p := startCAProxy(t, cells, ca1.PEM())
			if tc.data == nil {
				os.Remove(p.caFile)
			} else {
				replaceFile(t, p.caFile, tc.data, false)
			}
			for range 3 {
				p.fwd.ca.poll()
			}
			p.newConns(t, ca1.issue(t, true, "localhost"))
			p.check(t, true, "after a bad file: the CA read before")
			var warnings []string
			for l := range strings.Lines(p.Log.String()) {
				if strings.Contains(l, "level=WARN") && strings.Contains(l, "CELLS_UPSTREAM_CA_FILE") {
					warnings = append(warnings, l)
				}
			}
			if len(warnings) != 1 || !strings.Contains(warnings[0], tc.want) {
				t.Errorf("got warnings %q, want one that says %q", warnings, tc.want)
			}
			if err := p.Reload(); err == nil || !strings.Contains(err.Error(), "CELLS_UPSTREAM_CA_FILE") {
				t.Errorf("Reload() = %v, want an error naming CELLS_UPSTREAM_CA_FILE", err)
			}

			// Fixed: the next poll takes it.
			replaceFile(t, p.caFile, both, true)
			p.fwd.ca.poll()
			p.newConns(t, ca2.issue(t, true, "localhost"))
			p.check(t, true, "after the file was fixed")
		})
	}
}

// TestUpstreamCAReloadResumption: Cells' certificate changes without a
// restart, and it still resumes the TLS sessions of the proxy's
// connections made before: a resumed session brings the certificate of
// its first handshake, from the old CA. Once the file holds only the new
// CA, the proxy must not resume them (they would fail to verify), but make
// full handshakes.
func TestUpstreamCAReloadResumption(t *testing.T) {
	setCertPollInterval(t, time.Hour)
	ca1, ca2 := newTestCA(t, "cells root 1"), newTestCA(t, "cells root 2")
	cells := newCACells(t, ca1.issue(t, true, "localhost"))
	p := startCAProxy(t, cells, ca1.PEM())
	p.check(t, true, "Cells' certificate from the CA in the file")
	cells.serve(t, ca1.issue(t, true, "localhost"), true)
	p.waitNoGRPCConns(t)
	p.check(t, true, "again, over new connections")
	if cells.resumed.Load() == 0 {
		t.Fatal("no TLS session to Cells was resumed: the test does not cover resumption")
	}

	cells.serve(t, ca2.issue(t, true, "localhost"), true)
	p.waitNoGRPCConns(t)
	replaceFile(t, p.caFile, ca2.PEM(), true)
	p.fwd.ca.poll()
	p.check(t, true, "the file replaced with the new CA")
}

// TestUpstreamCAStaleSession: a handshake to Cells verified with the old
// CA that ends just after the file changed stores its session in the
// emptied cache (TLS 1.2: within the handshake; TLS 1.3: when its ticket
// arrives, at the connection's first read). Cells, which still takes that
// ticket, resumes it; the proxy refuses its certificate, from the old CA.
// With RootCAs crypto/tls would not have offered the session and would have
// made a full handshake: so must the proxy, on each path that dials Cells
// (a GET: the direct path; an upload: http.Transport's dial; a gRPC call).
// The request then succeeds with a certificate from the new CA, and is still
// refused (502) if Cells serves one from the old CA. The test makes the late
// store itself, with a session captured before the change, before each
// request; Cells counts the tickets it takes, to show the session was used.
func TestUpstreamCAStaleSession(t *testing.T) {
	for _, v := range []struct {
		name string
		max  uint16
	}{{"TLS 1.2", tls.VersionTLS12}, {"TLS 1.3", tls.VersionTLS13}} {
		t.Run(v.name, func(t *testing.T) {
			setCertPollInterval(t, time.Hour)
			ca1, ca2 := newTestCA(t, "cells root 1"), newTestCA(t, "cells root 2")
			cert1 := ca1.issue(t, true, "localhost")
			cells := newCACellsUpTo(t, cert1, v.max)
			p := startCAProxy(t, cells, ca1.PEM())
			p.check(t, true, "Cells' certificate from the CA in the file")

			// The sessions of the handshakes above, verified with CA1.
			stale := func(conf *tls.Config) *tls.ClientSessionState {
				t.Helper()
				cs, ok := conf.ClientSessionCache.Get(conf.ServerName)
				if !ok || cs == nil {
					t.Fatal("no session to Cells in the proxy's cache after a request")
				}
				return cs
			}
			paths := []struct {
				name string
				conf *tls.Config
				cs   *tls.ClientSessionState
				do   func() (ok bool, got string)
			}{{
				name: "GET",
				conf: p.fwd.httpUp.tls,
				do: func() (bool, string) {
					res, err := p.H1.Get(p.URL + "/a/frontend/bootconf")
					if err != nil {
						t.Fatalf("GET: %v", err)
					}
					res.Body.Close()
					return res.StatusCode == http.StatusOK, res.Status
				},
			}, {
				name: "upload",
				conf: p.fwd.httpUp.tls,
				do: func() (bool, string) {
					// Of unknown length: sent chunked, to http.Transport.
					req, err := http.NewRequest("PUT", p.URL+"/io/personal-files/a.bin", io.MultiReader(strings.NewReader("data")))
					if err != nil {
						t.Fatal(err)
					}
					res, err := p.H1.Do(req)
					if err != nil {
						t.Fatalf("PUT: %v", err)
					}
					res.Body.Close()
					return res.StatusCode == http.StatusOK, res.Status
				},
			}, {
				name: "gRPC",
				conf: p.fwd.grpcUp.tls,
				do: func() (bool, string) {
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					cc := newGRPCClient(t, p.testProxy, p.Addr().String())
					defer cc.Close()
					_, err := testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{})
					return err == nil, fmt.Sprint(err)
				},
			}}
			for i := range paths {
				paths[i].cs = stale(paths[i].conf)
			}

			cells.serve(t, cert1, true)
			p.waitNoGRPCConns(t)
			replaceFile(t, p.caFile, ca2.PEM(), true)
			p.fwd.ca.poll()
			run := func(ok bool, when string) {
				t.Helper()
				for _, pa := range paths {
					pa.conf.ClientSessionCache.Put(pa.conf.ServerName, pa.cs)
					before := cells.tickets.Load()
					if got, status := pa.do(); got != ok {
						t.Errorf("%s: %s with a session from the old CA in the cache: %s, want success %v", when, pa.name, status, ok)
					}
					if cells.tickets.Load() == before {
						t.Errorf("%s: %s: Cells took no session ticket: the test does not cover the stale session", when, pa.name)
					}
				}
			}
			run(false, "Cells still serving the old CA's certificate")

			cells.serve(t, ca2.issue(t, true, "localhost"), true)
			p.waitNoGRPCConns(t)
			refused := p.untrusted()
			run(true, "Cells serving the new CA's certificate")
			if got := p.untrusted() - refused; got != 0 {
				t.Errorf("with Cells serving the new CA's certificate, %d lines say it is not trusted, want 0", got)
			}
		})
	}
}

// TestUpstreamCAReloadSIGHUP: Reload, what SIGHUP calls, reads the file at
// once.
func TestUpstreamCAReloadSIGHUP(t *testing.T) {
	setCertPollInterval(t, time.Hour)
	ca1, ca2 := newTestCA(t, "cells root 1"), newTestCA(t, "cells root 2")
	cells := newCACells(t, ca1.issue(t, true, "localhost"))
	p := startCAProxy(t, cells, ca1.PEM())
	p.newConns(t, ca2.issue(t, true, "localhost"))
	replaceFile(t, p.caFile, ca2.PEM(), true)
	if err := p.Reload(); err != nil {
		t.Fatalf("Reload() = %v", err)
	}
	p.check(t, true, "after Reload")
}

// TestUpstreamCAHalfWrittenAtStart: a bundle caught at start while it is
// written (Cells writing certs/rootCA.pem as the proxy starts) stops the
// start with the variable named, rather than trusting its first roots only.
func TestUpstreamCAHalfWrittenAtStart(t *testing.T) {
	ca1, ca2 := newTestCA(t, "cells root 1"), newTestCA(t, "cells root 2")
	both := append(ca1.PEM(), ca2.PEM()...)
	caFile := filepath.Join(t.TempDir(), "rootCA.pem")
	if err := os.WriteFile(caFile, both[:len(both)-len(ca2.PEM())/2], 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(newCACells(t, ca1.issue(t, true, "localhost")).testUpstream)
	cfg.UpstreamCAFile = caFile
	_, err := New(cfg, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "CELLS_UPSTREAM_CA_FILE") || !strings.Contains(err.Error(), "unfinished") {
		t.Errorf("New with a half-written CELLS_UPSTREAM_CA_FILE: %v, want an error naming it and saying the file is unfinished", err)
	}
}
