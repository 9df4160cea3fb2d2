package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestUpstreamCAVerifiesAsRootCAs: a tls.Config to Cells that verifies
// with CELLS_UPSTREAM_CA_FILE in VerifyConnection (upstreamCA.configure)
// accepts and refuses what one with the same pool as RootCAs does (the
// proxy before the CA file was reloadable), on a full handshake and on a
// resumed one, TLS 1.2 and 1.3, against a real TLS server: names (a DNS
// name, an IP address), key usage, an unknown root, expiry of the leaf and
// of the intermediate between the first handshake and the resumption. A
// refusal carries the same x509 error type (what classify maps to "upstream
// certificate not trusted").
func TestUpstreamCAVerifiesAsRootCAs(t *testing.T) {
	t0 := time.Now()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	type issuer struct {
		cert *x509.Certificate
		key  *ecdsa.PrivateKey
	}
	ca := func(parent *issuer, cn string, notAfter time.Time) *issuer {
		k := newKey()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(testSerial.Add(1)), Subject: pkix.Name{CommonName: cn},
			NotBefore: t0.Add(-time.Hour), NotAfter: notAfter, IsCA: true,
			BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		if parent == nil {
			return &issuer{cert: signCert(t, tmpl, tmpl, &k.PublicKey, k), key: k}
		}
		return &issuer{cert: signCert(t, tmpl, parent.cert, &k.PublicKey, parent.key), key: k}
	}
	type leafOpt func(*x509.Certificate)
	leaf := func(by *issuer, opts ...leafOpt) (*x509.Certificate, *ecdsa.PrivateKey) {
		k := newKey()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(testSerial.Add(1)), Subject: pkix.Name{CommonName: "cells"},
			NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(24 * time.Hour), DNSNames: []string{"cells.test"},
			IPAddresses: []net.IP{net.IPv4(10, 0, 0, 5)},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
		for _, o := range opts {
			o(tmpl)
		}
		return signCert(t, tmpl, by.cert, &k.PublicKey, by.key), k
	}

	root := ca(nil, "cells root", t0.Add(48*time.Hour))
	other := ca(nil, "another root", t0.Add(48*time.Hour))
	inter := ca(root, "cells intermediate", t0.Add(48*time.Hour))
	shortInter := ca(root, "cells intermediate ending first", t0.Add(time.Hour))
	pool := x509.NewCertPool()
	pool.AddCert(root.cert)
	caFile := filepath.Join(t.TempDir(), "rootCA.pem")
	if err := os.WriteFile(caFile, (&testCA{cert: root.cert}).PEM(), 0o600); err != nil {
		t.Fatal(err)
	}

	later := t0.Add(2 * time.Hour) // shortInter ended, the others not
	tests := []struct {
		name  string
		by    *issuer // the leaf's issuer
		chain []*issuer
		opts  []leafOpt
		host  string    // ServerName, and the name verified
		then  time.Time // the clock at the second handshake, resumed if it can be
	}{
		{name: "dns name", by: root, host: "cells.test", then: t0},
		{name: "ip address", by: root, host: "10.0.0.5", then: t0},
		{name: "other dns name", by: root, host: "other.test", then: t0},
		{name: "other ip address", by: root, host: "10.0.0.6", then: t0},
		{name: "name upper case", by: root, host: "CELLS.test", then: t0},
		{name: "client auth only", by: root, host: "cells.test", then: t0, opts: []leafOpt{func(c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}}},
		{name: "no extended key usage", by: root, host: "cells.test", then: t0, opts: []leafOpt{func(c *x509.Certificate) {
			c.ExtKeyUsage = nil
		}}},
		{name: "unknown root", by: other, host: "cells.test", then: t0},
		{name: "not yet valid", by: root, host: "cells.test", then: t0, opts: []leafOpt{func(c *x509.Certificate) {
			c.NotBefore = t0.Add(time.Hour)
		}}},
		{name: "expired", by: root, host: "cells.test", then: t0, opts: []leafOpt{func(c *x509.Certificate) {
			c.NotAfter = t0.Add(-time.Minute)
		}}},
		{name: "intermediate", by: inter, chain: []*issuer{inter}, host: "cells.test", then: later},
		{name: "intermediate not sent", by: inter, host: "cells.test", then: t0},
		{name: "leaf expired before resumption", by: root, host: "cells.test", then: later, opts: []leafOpt{func(c *x509.Certificate) {
			c.NotAfter = t0.Add(time.Hour)
		}}},
		{name: "intermediate expired before resumption", by: shortInter, chain: []*issuer{shortInter}, host: "cells.test", then: later},
	}
	for _, vers := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		for _, tt := range tests {
			t.Run(tls.VersionName(vers)+"/"+tt.name, func(t *testing.T) {
				cert, key := leaf(tt.by, tt.opts...)
				chain := [][]byte{cert.Raw}
				for _, c := range tt.chain {
					chain = append(chain, c.cert.Raw)
				}
				addr := resumingTLSServer(t, &tls.Config{
					Certificates: []tls.Certificate{{Certificate: chain, PrivateKey: key}},
					MinVersion:   vers, MaxVersion: vers,
				})
				var clock atomic.Pointer[time.Time]
				clock.Store(&t0)
				now := func() time.Time { return *clock.Load() }
				ref := &tls.Config{RootCAs: pool, ServerName: tt.host, Time: now, MinVersion: tls.VersionTLS12,
					ClientSessionCache: tls.NewLRUClientSessionCache(1)}
				up, err := newUpstreamCA(caFile, nil)
				if err != nil {
					t.Fatal(err)
				}
				got := &tls.Config{ServerName: tt.host, Time: now, MinVersion: tls.VersionTLS12}
				up.configure(got, tt.host)

				for i, at := range []time.Time{t0, tt.then} {
					clock.Store(&at)
					_, refErr := handshakeAt(t, addr, ref)
					resumed, err := handshakeAt(t, addr, got)
					if (err == nil) != (refErr == nil) {
						t.Fatalf("handshake %d (resumed %v): got error %v, want %v (RootCAs)", i+1, resumed, err, refErr)
					}
					if err != nil {
						if got, want := x509ErrorType(err), x509ErrorType(refErr); got != want {
							t.Errorf("handshake %d: got %s (%v), want %s (%v)", i+1, got, err, want, refErr)
						}
						return
					}
					if i == 1 && !resumed {
						t.Errorf("handshake 2 not resumed: the test does not cover resumption")
					}
				}
			})
		}
	}
}

// x509ErrorType names the x509 error inside err, as classify looks for it.
func x509ErrorType(err error) string {
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
	)
	switch {
	case errors.As(err, &unknown):
		return "x509.UnknownAuthorityError"
	case errors.As(err, &hostname):
		return "x509.HostnameError"
	case errors.As(err, &invalid):
		return "x509.CertificateInvalidError"
	}
	return "another error"
}

// resumingTLSServer accepts TLS connections with conf until the test ends,
// and on each writes one byte after the handshake (after its TLS 1.3
// session tickets), then waits for the client to close.
func resumingTLSServer(t *testing.T, conf *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", conf)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Minute))
				if _, err := c.Write([]byte{1}); err != nil {
					return
				}
				io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// handshakeAt connects to addr with conf and reads the server's byte, which
// makes the client take the TLS 1.3 session tickets sent before it.
func handshakeAt(t *testing.T, addr string, conf *tls.Config) (resumed bool, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	raw, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(time.Minute))
	tc := tls.Client(raw, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		return false, err
	}
	if _, err := io.ReadFull(tc, make([]byte, 1)); err != nil {
		t.Fatalf("reading the server's byte: %v", err)
	}
	return tc.ConnectionState().DidResume, nil
}

// TestUpstreamCAUnusedNotWatched: with Cells in clear and gRPC with it
// (topology B), nothing verifies a certificate of Cells, and a
// CELLS_UPSTREAM_CA_FILE left set gets one warning at start ("does
// nothing"). The file is not watched then: Cells run with
// CELLS_SITE_NO_TLS=1 may remove or rewrite it, and SIGHUP must not
// answer with an error, nor a poll log that it "keeps verifying Cells".
func TestUpstreamCAUnusedNotWatched(t *testing.T) {
	setCertPollInterval(t, time.Hour)
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	caFile := filepath.Join(t.TempDir(), "rootCA.pem")
	if err := os.WriteFile(caFile, newTestCA(t, "cells root").PEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(up)
	cfg.UpstreamCAFile = caFile
	p := startProxy(t, cfg)
	if err := os.Remove(caFile); err != nil {
		t.Fatal(err)
	}
	if err := p.Reload(); err != nil {
		t.Errorf("Reload() with the unused CA file removed = %v, want nil", err)
	}
	if p.fwd.ca != nil {
		p.fwd.ca.poll()
	}
	if log := p.Log.String(); strings.Contains(log, "CELLS_UPSTREAM_CA_FILE") {
		t.Errorf("log names the unused CELLS_UPSTREAM_CA_FILE:\n%s", log)
	}
	res, err := p.H1.Get(p.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if got, want := res.StatusCode, http.StatusOK; got != want {
		t.Errorf("GET through the proxy: status %d, want %d", got, want)
	}
}
