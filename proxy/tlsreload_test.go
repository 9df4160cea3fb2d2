package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// setCertPollInterval changes how often the certificate files are polled
// for the test. Tests that call it must not be parallel: the proxy's Run
// reads the variable.
func setCertPollInterval(t *testing.T, d time.Duration) {
	t.Helper()
	old := certPollInterval
	certPollInterval = d
	t.Cleanup(func() { certPollInterval = old })
}

// newCert is a fresh self-signed certificate for 127.0.0.1, its serial
// unique.
func newCert(t testing.TB) tls.Certificate {
	t.Helper()
	c, err := SelfSigned("localhost", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// reloadProxy is a proxy serving certFile and keyFile, with a gRPC port,
// and a pool that trusts every certificate the test will serve.
type reloadProxy struct {
	*testProxy
	certFile, keyFile string
	roots             *x509.CertPool
}

func startReloadProxy(t *testing.T, certFile, keyFile string, trust ...tls.Certificate) *reloadProxy {
	t.Helper()
	up := newUpstream(t, upTLS, &recorder{})
	cfg := testConfig(up)
	cfg.CertFile, cfg.KeyFile = certFile, keyFile
	cfg.GRPCAddr = "127.0.0.1:0"
	rp := &reloadProxy{testProxy: startProxy(t, cfg), certFile: certFile, keyFile: keyFile, roots: x509.NewCertPool()}
	for _, c := range trust {
		rp.roots.AddCert(c.Leaf)
	}
	return rp
}

// serial is the serial of the certificate a new handshake on addr gets.
func (rp *reloadProxy) serial(t *testing.T, addr string) *big.Int {
	t.Helper()
	st, err := handshake(addr, &tls.Config{RootCAs: rp.roots, ServerName: "127.0.0.1", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatalf("handshake with %s: %v", addr, err)
	}
	return st.PeerCertificates[0].SerialNumber
}

// waitSerial waits until new handshakes on addr get the certificate want.
// The poller runs every few milliseconds in these tests; the bound is
// generous for a loaded machine.
func (rp *reloadProxy) waitSerial(t *testing.T, addr string, want tls.Certificate) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := rp.serial(t, addr)
		if got.Cmp(want.Leaf.SerialNumber) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still serves serial %x after 20s, want %x\nproxy log:\n%s", addr, got, want.Leaf.SerialNumber, rp.Log)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (rp *reloadProxy) wantSerial(t *testing.T, addr string, want tls.Certificate, when string) {
	t.Helper()
	if got := rp.serial(t, addr); got.Cmp(want.Leaf.SerialNumber) != 0 {
		t.Errorf("%s: %s serves serial %x, want %x", when, addr, got, want.Leaf.SerialNumber)
	}
}

// h2Client is an HTTP/2 client that trusts rp's certificates.
func (rp *reloadProxy) h2Client() *http.Client {
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: rp.roots, ServerName: "127.0.0.1"}}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP2(true)
	return &http.Client{Transport: tr}
}

// get does GET url with c and reports the certificate of the connection
// it went over and whether that connection was reused.
func get(t *testing.T, c *http.Client, url string) (serial *big.Int, reused bool) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused },
	}))
	res, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || res.ProtoMajor != 2 {
		t.Fatalf("GET %s: %s %s, want HTTP/2 200", url, res.Proto, res.Status)
	}
	return res.TLS.PeerCertificates[0].SerialNumber, reused
}

// TestCertReloadRewrite: files rewritten in place (a script, cp) are picked
// up by the poller; an HTTP/2 connection opened before keeps working on
// its certificate, and the gRPC port serves the new one too.
func TestCertReloadRewrite(t *testing.T) {
	setCertPollInterval(t, 10*time.Millisecond)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "fullchain.pem"), filepath.Join(dir, "privkey.pem")
	a, b := newCert(t), newCert(t)
	writePair(t, a, certFile, keyFile)
	rp := startReloadProxy(t, certFile, keyFile, a, b)
	pub, grpc := rp.Addr().String(), rp.GRPCAddr().String()
	rp.wantSerial(t, pub, a, "before")
	rp.wantSerial(t, grpc, a, "before")

	c := rp.h2Client()
	defer c.CloseIdleConnections()
	if serial, _ := get(t, c, rp.URL+"/before"); serial.Cmp(a.Leaf.SerialNumber) != 0 {
		t.Fatalf("first request: serial %x, want %x", serial, a.Leaf.SerialNumber)
	}

	writePair(t, b, certFile, keyFile)
	rp.waitSerial(t, pub, b)
	rp.wantSerial(t, grpc, b, "after the rewrite")
	if !strings.Contains(rp.Log.String(), "TLS certificate reloaded") {
		t.Errorf("no \"TLS certificate reloaded\" in the log:\n%s", rp.Log)
	}

	// The connection opened before is still up and still on a.
	serial, reused := get(t, c, rp.URL+"/after")
	if !reused {
		t.Errorf("request after the reload opened a new connection, want the open one reused")
	}
	if serial.Cmp(a.Leaf.SerialNumber) != 0 {
		t.Errorf("open connection: serial %x, want the old %x", serial, a.Leaf.SerialNumber)
	}
}

// TestCertReloadWrittenInParts: a poll that catches TLS_CERT_FILE between
// two writes of its writer (cat cert.pem chain.pem > fullchain.pem writes
// the leaf, then the intermediate) reads a pair that loads: the leaf alone,
// which Go's clients (Cells Sync) and curl refuse for want of the
// intermediate. It must not be served: the certificate served before stays
// until the next poll, which serves the whole chain.
func TestCertReloadWrittenInParts(t *testing.T) {
	setCertPollInterval(t, time.Hour) // the test drives the polls
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "fullchain.pem"), filepath.Join(dir, "privkey.pem")
	a := newCert(t)
	writePair(t, a, certFile, keyFile)
	rp := startReloadProxy(t, certFile, keyFile, a)
	addr := rp.Addr().String()
	served := func() []*x509.Certificate {
		t.Helper()
		st, err := handshake(addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		return st.PeerCertificates
	}

	leaf, inter, key := chainCerts(t, "R3", time.Now().Add(48*time.Hour), nil)
	whole := tls.Certificate{Certificate: [][]byte{leaf.Raw, inter.Raw}, PrivateKey: key, Leaf: leaf}
	half := tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
	// The key, and the first write; the second comes while the poll reads.
	writePair(t, half, certFile, keyFile)
	testHookSettle = func() {
		certPEM, _ := pemPair(t, whole)
		if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
			t.Error(err)
		}
	}
	t.Cleanup(func() { testHookSettle = nil })
	rp.certFiles.poll()
	if got := served(); got[0].SerialNumber.Cmp(a.Leaf.SerialNumber) != 0 {
		t.Errorf("after a poll that read the chain half written, %d certificate(s) served, leaf serial %x; want the one served before (%x)", len(got), got[0].SerialNumber, a.Leaf.SerialNumber)
	}

	testHookSettle = nil
	rp.certFiles.poll()
	if got := served(); len(got) != 2 || !got[0].Equal(leaf) || !got[1].Equal(inter) {
		t.Errorf("after the next poll, %d certificate(s) served, want the leaf and its intermediate", len(got))
	}
	if !strings.Contains(rp.Log.String(), "TLS certificate reloaded") {
		t.Errorf("no \"TLS certificate reloaded\" in the log:\n%s", rp.Log)
	}
}

// TestCertReloadSymlinks replays how certbot and cert-manager renew: the
// files named in TLS_CERT_FILE and TLS_KEY_FILE are symlinks, and a renewal
// repoints them without touching the old files.
func TestCertReloadSymlinks(t *testing.T) {
	setCertPollInterval(t, 10*time.Millisecond)
	symlink := func(t *testing.T, target, link string) {
		t.Helper()
		// Atomic replace, as both tools do: a new link, renamed over.
		tmp := link + ".tmp"
		if err := os.Symlink(target, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, link); err != nil {
			t.Fatal(err)
		}
	}
	mkdir := func(t *testing.T, d string) {
		t.Helper()
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("certbot", func(t *testing.T) {
		// /etc/letsencrypt/live/NAME/fullchain.pem -> ../../archive/NAME/fullchainN.pem
		root := t.TempDir()
		live, archive := filepath.Join(root, "live", "cells"), filepath.Join(root, "archive", "cells")
		mkdir(t, live)
		mkdir(t, archive)
		a, b := newCert(t), newCert(t)
		writePair(t, a, filepath.Join(archive, "fullchain1.pem"), filepath.Join(archive, "privkey1.pem"))
		certFile, keyFile := filepath.Join(live, "fullchain.pem"), filepath.Join(live, "privkey.pem")
		symlink(t, "../../archive/cells/fullchain1.pem", certFile)
		symlink(t, "../../archive/cells/privkey1.pem", keyFile)
		rp := startReloadProxy(t, certFile, keyFile, a, b)
		rp.wantSerial(t, rp.Addr().String(), a, "before")

		writePair(t, b, filepath.Join(archive, "fullchain2.pem"), filepath.Join(archive, "privkey2.pem"))
		symlink(t, "../../archive/cells/privkey2.pem", keyFile)
		symlink(t, "../../archive/cells/fullchain2.pem", certFile)
		rp.waitSerial(t, rp.Addr().String(), b)
		rp.wantSerial(t, rp.GRPCAddr().String(), b, "after the renewal")
	})

	t.Run("cert-manager", func(t *testing.T) {
		// A Kubernetes secret volume: tls.crt -> ..data/tls.crt,
		// ..data -> ..2024_01_01_00_00_00.1; an update writes a new
		// timestamped directory and renames a new ..data link over the
		// old one (kubernetes AtomicWriter).
		vol := t.TempDir()
		a, b := newCert(t), newCert(t)
		v1, v2 := filepath.Join(vol, "..2024_01_01_00_00_00.1"), filepath.Join(vol, "..2024_03_01_00_00_00.2")
		mkdir(t, v1)
		writePair(t, a, filepath.Join(v1, "tls.crt"), filepath.Join(v1, "tls.key"))
		symlink(t, filepath.Base(v1), filepath.Join(vol, "..data"))
		certFile, keyFile := filepath.Join(vol, "tls.crt"), filepath.Join(vol, "tls.key")
		symlink(t, "..data/tls.crt", certFile)
		symlink(t, "..data/tls.key", keyFile)
		rp := startReloadProxy(t, certFile, keyFile, a, b)
		rp.wantSerial(t, rp.Addr().String(), a, "before")

		mkdir(t, v2)
		writePair(t, b, filepath.Join(v2, "tls.crt"), filepath.Join(v2, "tls.key"))
		symlink(t, filepath.Base(v2), filepath.Join(vol, "..data"))
		if err := os.RemoveAll(v1); err != nil {
			t.Fatal(err)
		}
		rp.waitSerial(t, rp.Addr().String(), b)
		rp.wantSerial(t, rp.GRPCAddr().String(), b, "after the update")
	})
}

// TestCertReloadRefusesBrokenPair: a pair that does not load leaves the
// current certificate serving, with an error in the log that names
// TLS_CERT_FILE, logged once however many polls see it; once the files are
// fixed, the fixed pair is served.
func TestCertReloadRefusesBrokenPair(t *testing.T) {
	a, b := newCert(t), newCert(t)
	bCert, bKey := pemPair(t, b)
	aCert, aKey := pemPair(t, a)
	for _, tc := range []struct {
		name      string
		cert, key []byte
	}{
		{"mismatched key", bCert, aKey},
		{"garbage", []byte("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"), bKey},
		{"half-written certificate", bCert[:len(bCert)/2], bKey},
		{"half-written key", bCert, bKey[:len(bKey)/2]},
		// A fullchain.pem cut in its intermediate: the leaf alone would
		// match the key, and clients would get no chain.
		{"half-written chain", append(bCert[:len(bCert):len(bCert)], aCert[:len(aCert)/2]...), bKey},
		{"empty", nil, nil},
		{"key in both", bKey, bKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
			writePair(t, a, certFile, keyFile)
			setCertPollInterval(t, time.Hour) // the test drives the checks
			rp := startReloadProxy(t, certFile, keyFile, a, b)

			if err := os.WriteFile(certFile, tc.cert, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(keyFile, tc.key, 0o600); err != nil {
				t.Fatal(err)
			}
			// Three polls see the broken pair: a warning, then one
			// error line.
			for range 3 {
				rp.certFiles.poll()
			}
			rp.wantSerial(t, rp.Addr().String(), a, "after a broken pair")
			rp.wantSerial(t, rp.GRPCAddr().String(), a, "after a broken pair")
			if got, want := reloadLines(rp.Log.String(), "WARN"), 1; got != want {
				t.Errorf("%d warning lines for one broken pair, want %d; log:\n%s", got, want, rp.Log)
			}
			if got, want := reloadLines(rp.Log.String(), "ERROR"), 1; got != want {
				t.Errorf("%d error lines for one broken pair, want %d; log:\n%s", got, want, rp.Log)
			}
			if !strings.Contains(rp.Log.String(), "level=ERROR") || !strings.Contains(rp.Log.String(), "TLS_CERT_FILE") {
				t.Errorf("the log does not name TLS_CERT_FILE in an error:\n%s", rp.Log)
			}
			// Reload (SIGHUP) says so too, and returns the error.
			if err := rp.Reload(); err == nil || !strings.Contains(err.Error(), "TLS_CERT_FILE") {
				t.Errorf("Reload() = %v, want an error naming TLS_CERT_FILE", err)
			}
			rp.wantSerial(t, rp.Addr().String(), a, "after Reload of a broken pair")

			// The renewal completes: the next poll serves it.
			writePair(t, b, certFile, keyFile)
			rp.certFiles.poll()
			rp.wantSerial(t, rp.Addr().String(), b, "after the pair was fixed")
		})
	}

	t.Run("files gone", func(t *testing.T) {
		dir := t.TempDir()
		certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
		writePair(t, a, certFile, keyFile)
		setCertPollInterval(t, time.Hour)
		rp := startReloadProxy(t, certFile, keyFile, a)
		os.Remove(certFile)
		rp.certFiles.poll()
		rp.wantSerial(t, rp.Addr().String(), a, "after the file was removed")
		if !strings.Contains(rp.Log.String(), "TLS_CERT_FILE") {
			t.Errorf("the log does not name TLS_CERT_FILE:\n%s", rp.Log)
		}
	})
}

// reloadLines counts the lines of log at level that say a pair found
// broken was not served.
func reloadLines(log, level string) int {
	n := 0
	for l := range strings.SplitSeq(log, "\n") {
		if strings.Contains(l, "level="+level+" ") &&
			(strings.Contains(l, "TLS certificate not reloaded") || strings.Contains(l, "TLS certificate files do not load")) {
			n++
		}
	}
	return n
}

// TestCertReloadTwoSteps: a renewal that writes the certificate, then the
// key (cp cert; cp key, or certbot repointing its two live/ symlinks) can
// be caught in between by a poll, which finds a certificate and a key that
// do not match. That poll warns, serves the current pair still and pages
// no one; the next poll serves the renewed pair. Files still broken at the
// next poll, the same way or another, are an error, logged once; a SIGHUP
// that finds them broken is an error at once.
func TestCertReloadTwoSteps(t *testing.T) {
	a, b, c := newCert(t), newCert(t), newCert(t)
	bCert, _ := pemPair(t, b)
	cCert, _ := pemPair(t, c)
	_, aKey := pemPair(t, a)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "fullchain.pem"), filepath.Join(dir, "privkey.pem")
	writePair(t, a, certFile, keyFile)
	setCertPollInterval(t, time.Hour) // the test drives the checks
	rp := startReloadProxy(t, certFile, keyFile, a, b, c)
	count := func(when string, warns, errs int) {
		t.Helper()
		if got := reloadLines(rp.Log.String(), "WARN"); got != warns {
			t.Errorf("%s: %d warning lines, want %d; log:\n%s", when, got, warns, rp.Log)
		}
		if got := reloadLines(rp.Log.String(), "ERROR"); got != errs {
			t.Errorf("%s: %d error lines, want %d; log:\n%s", when, got, errs, rp.Log)
		}
	}

	// cp cert: a poll comes before cp key.
	if err := os.WriteFile(certFile, bCert, 0o600); err != nil {
		t.Fatal(err)
	}
	rp.certFiles.poll()
	rp.wantSerial(t, rp.Addr().String(), a, "between the two files")
	count("a poll between the two files", 1, 0)
	if l := rp.Log.String(); !strings.Contains(l, "keeps serving") || !strings.Contains(l, "next poll") {
		t.Errorf("the warning does not say the current certificate is kept and checked again at the next poll:\n%s", l)
	}
	// cp key: the next poll serves the renewal, with no error.
	writePair(t, b, certFile, keyFile)
	rp.certFiles.poll()
	rp.wantSerial(t, rp.Addr().String(), b, "after the second file")
	count("after the renewal", 1, 0)

	// A renewal that stops half-way: the next poll finds it broken
	// still, an error; the polls after it say nothing more.
	if err := os.WriteFile(certFile, cCert, 0o600); err != nil {
		t.Fatal(err)
	}
	rp.certFiles.poll()
	count("a first poll of a broken pair", 2, 0)
	rp.certFiles.poll()
	count("a second poll of a broken pair", 2, 1)
	rp.certFiles.poll()
	count("a third poll of a broken pair", 2, 1)
	// Broken another way at the next poll: an error again.
	if err := os.WriteFile(keyFile, aKey[:len(aKey)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	rp.certFiles.poll()
	count("another breakage", 2, 2)
	// SIGHUP on files broken is an error at once, and the polls after it
	// do not repeat it.
	writePair(t, b, certFile, keyFile)
	rp.certFiles.poll()
	if err := os.WriteFile(certFile, cCert, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := rp.Reload(); err == nil {
		t.Errorf("Reload of a mismatched pair: no error")
	}
	count("Reload of a mismatched pair", 2, 3)
	rp.certFiles.poll()
	count("a poll after Reload", 2, 3)
	rp.wantSerial(t, rp.Addr().String(), b, "after the broken pairs")
}

// TestCertReloadBrokenAgain: files that break, come back to the served
// pair and later break the same way again are logged each time they
// break: the second breakage is news, not the repeat of the first.
func TestCertReloadBrokenAgain(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	a := newCert(t)
	writePair(t, a, certFile, keyFile)
	setCertPollInterval(t, time.Hour) // the test drives the checks
	rp := startReloadProxy(t, certFile, keyFile, a)
	for i := range 2 {
		// The key becomes unreadable (a secret volume being remounted,
		// a renewal that lost it), then comes back unchanged.
		if err := os.Rename(keyFile, keyFile+".away"); err != nil {
			t.Fatal(err)
		}
		rp.certFiles.poll()
		rp.certFiles.poll()
		if err := os.Rename(keyFile+".away", keyFile); err != nil {
			t.Fatal(err)
		}
		rp.certFiles.poll()
		if got, want := reloadLines(rp.Log.String(), "WARN"), i+1; got != want {
			t.Errorf("after breakage %d: %d warning lines, want %d; log:\n%s", i+1, got, want, rp.Log)
		}
		if got, want := reloadLines(rp.Log.String(), "ERROR"), i+1; got != want {
			t.Errorf("after breakage %d: %d error lines, want %d; log:\n%s", i+1, got, want, rp.Log)
		}
	}
	rp.wantSerial(t, rp.Addr().String(), a, "after the files came back")
}

// TestReload: Server.Reload, what SIGHUP calls, serves the new files at
// once, with no poll in between.
func TestReload(t *testing.T) {
	setCertPollInterval(t, time.Hour)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	a, b := newCert(t), newCert(t)
	writePair(t, a, certFile, keyFile)
	rp := startReloadProxy(t, certFile, keyFile, a, b)

	writePair(t, b, certFile, keyFile)
	rp.wantSerial(t, rp.Addr().String(), a, "before Reload (no poll for an hour)")
	if err := rp.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	rp.wantSerial(t, rp.Addr().String(), b, "after Reload")
	rp.wantSerial(t, rp.GRPCAddr().String(), b, "after Reload")
	// Reloading the same files again is harmless.
	if err := rp.Reload(); err != nil {
		t.Fatalf("second Reload: %v", err)
	}
	rp.wantSerial(t, rp.Addr().String(), b, "after a second Reload")
}

// TestReloadSelfSigned: with no TLS_CERT_FILE there is nothing to reload;
// Reload says so and the generated certificate keeps serving.
func TestReloadSelfSigned(t *testing.T) {
	up := newUpstream(t, upTLS, &recorder{})
	tp := startProxy(t, testConfig(up))
	before := tp.cert.Load()
	if err := tp.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if tp.cert.Load() != before {
		t.Errorf("Reload replaced the self-signed certificate")
	}
}

// TestSelfSignedRenewal: the self-signed certificate is valid for a year,
// and a proxy running longer served it expired until restarted. The
// handshake that finds it within selfSignedRenewBefore of its end now gets
// a new one for the same names, once, and the handshakes after it too;
// concurrent handshakes all get the new one.
func TestSelfSignedRenewal(t *testing.T) {
	up := newUpstream(t, upTLS, &recorder{})
	cfg := testConfig(up)
	cfg.ServerNames = []string{"cells.example.com", "192.0.2.7"}
	names := []string{"localhost", "127.0.0.1", "::1", "cells.example.com", "192.0.2.7"}
	nearEnd := func() *tls.Certificate {
		c, err := selfSigned(time.Hour, names...)
		if err != nil {
			t.Fatal(err)
		}
		return &c
	}
	old := nearEnd()
	tp := startProxy(t, cfg, func(s *Server) { s.cert.Store(old) })
	addr := tp.Addr().String()
	served := func(name string) *x509.Certificate {
		t.Helper()
		// The certificate is checked below, not by the handshake: the
		// test looks at whichever one is served.
		cs, err := handshake(addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		return cs.PeerCertificates[0]
	}
	renewals := func() int { return strings.Count(tp.Log.String(), "self-signed certificate nears its end") }

	fresh := served("cells.example.com")
	if fresh.SerialNumber.Cmp(old.Leaf.SerialNumber) == 0 {
		t.Fatalf("a certificate an hour from its end is still served (serial %x)", fresh.SerialNumber)
	}
	if got, want := fresh.NotAfter, time.Now().Add(selfSignedRenewBefore); !got.After(want) {
		t.Errorf("new certificate ends %v, want after %v", got, want)
	}
	if got, want := fmt.Sprint(fresh.DNSNames, fresh.IPAddresses), fmt.Sprint(old.Leaf.DNSNames, old.Leaf.IPAddresses); got != want {
		t.Errorf("new certificate names %s, want %s", got, want)
	}
	roots := x509.NewCertPool()
	roots.AddCert(fresh)
	for _, n := range names {
		if _, err := fresh.Verify(x509.VerifyOptions{Roots: roots, DNSName: n}); err != nil {
			t.Errorf("new certificate does not verify for %s: %v", n, err)
		}
	}
	if got := served("localhost"); got.SerialNumber.Cmp(fresh.SerialNumber) != 0 {
		t.Errorf("next handshake: serial %x, want the new %x", got.SerialNumber, fresh.SerialNumber)
	}
	if got := renewals(); got != 1 {
		t.Errorf("%d renewal warnings, want 1; log:\n%s", got, tp.Log.String())
	}

	// Many handshakes find the next one near its end at once: one makes
	// the new certificate and they all get it.
	old = nearEnd()
	tp.cert.Store(old)
	const n = 16
	serials := make([]*big.Int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			cs, err := handshake(addr, &tls.Config{ServerName: "cells.example.com", InsecureSkipVerify: true})
			if err != nil {
				t.Errorf("concurrent handshake %d: %v", i, err)
				return
			}
			serials[i] = cs.PeerCertificates[0].SerialNumber
		})
	}
	wg.Wait()
	for i, s := range serials {
		switch {
		case s == nil:
		case s.Cmp(old.Leaf.SerialNumber) == 0:
			t.Errorf("concurrent handshake %d got the certificate near its end", i)
		case s.Cmp(serials[0]) != 0:
			t.Errorf("concurrent handshake %d: serial %x, handshake 0 got %x: more than one new certificate", i, s, serials[0])
		}
	}
	if got := renewals(); got != 2 {
		t.Errorf("%d renewal warnings, want 2; log:\n%s", got, tp.Log.String())
	}
}

// TestNewRefusesBrokenPair: at start a bad pair is an error naming the
// variables, not a server with no certificate.
func TestNewRefusesBrokenPair(t *testing.T) {
	a, b := newCert(t), newCert(t)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	bCert, _ := pemPair(t, b)
	_, aKey := pemPair(t, a)
	os.WriteFile(certFile, bCert, 0o600)
	os.WriteFile(keyFile, aKey, 0o600)
	cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
	cfg.CertFile, cfg.KeyFile = certFile, keyFile
	if _, err := New(cfg, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "TLS_CERT_FILE") {
		t.Errorf("New with a mismatched pair: error %v, want one naming TLS_CERT_FILE", err)
	}
}

// certValidFor is a self-signed certificate for names, valid from notBefore
// to notAfter.
func certValidFor(t *testing.T, notBefore, notAfter time.Time, names ...string) tls.Certificate {
	t.Helper()
	c := newCert(t)
	key := c.PrivateKey.(*ecdsa.PrivateKey)
	tmpl := *c.Leaf
	tmpl.NotBefore, tmpl.NotAfter = notBefore, notAfter
	tmpl.DNSNames, tmpl.IPAddresses = nil, nil
	return signSelf(t, &tmpl, key, &key.PublicKey, names...)
}

// TestCertWarnings: what clients would refuse in the served certificate is
// said in the log, at start, at a renewal, and once a day while it stays;
// the certificate is served all the same.
func TestCertWarnings(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name      string
		from, to  time.Time
		names     []string
		wantWarns []string
	}{
		{"fine", now.Add(-time.Hour), now.Add(90 * 24 * time.Hour), []string{"files.example.com"}, nil},
		{"expired", now.Add(-90 * 24 * time.Hour), now.Add(-time.Hour), nil, []string{"has expired"}},
		{"not valid yet", now.Add(time.Hour), now.Add(90 * 24 * time.Hour), nil, []string{"not valid yet"}},
		{"expires soon", now.Add(-time.Hour), now.Add(3 * 24 * time.Hour), nil, []string{"less than 7 days"}},
		{"a name not covered", now.Add(-time.Hour), now.Add(90 * 24 * time.Hour), []string{"files.example.com", "cells.example.org"},
			[]string{"does not cover cells.example.org"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			setCertPollInterval(t, time.Hour) // the test drives the checks
			dir := t.TempDir()
			certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
			cert := certValidFor(t, tc.from, tc.to, "127.0.0.1", "files.example.com")
			writePair(t, cert, certFile, keyFile)
			up := newUpstream(t, upTLS, &recorder{})
			cfg := testConfig(up)
			cfg.CertFile, cfg.KeyFile, cfg.ServerNames = certFile, keyFile, tc.names
			tp := startProxy(t, cfg)

			warns := func() []string {
				var w []string
				for l := range strings.SplitSeq(tp.Log.String(), "\n") {
					if strings.Contains(l, "level=WARN") && strings.Contains(l, "TLS_CERT_FILE's certificate") {
						w = append(w, l)
					}
				}
				return w
			}
			check := func(when string, times int) {
				t.Helper()
				got := warns()
				if len(got) != len(tc.wantWarns)*times {
					t.Fatalf("%s: %d warnings, want %d:\n%s", when, len(got), len(tc.wantWarns)*times, tp.Log)
				}
				for i, l := range got {
					if w := tc.wantWarns[i%len(tc.wantWarns)]; !strings.Contains(l, w) {
						t.Errorf("%s: warning %q, want one saying %q", when, l, w)
					}
				}
			}
			check("at start", 1)
			// Served all the same.
			if _, err := handshake(tp.Addr().String(), &tls.Config{InsecureSkipVerify: true}); err != nil {
				t.Fatalf("handshake: %v", err)
			}
			// The polls between two daily checks say nothing again.
			tp.certFiles.poll()
			check("after a poll", 1)
			// A day later, the unchanged certificate is checked again.
			tp.certFiles.checked.Store(time.Now().Add(-certCheckInterval).Unix())
			tp.certFiles.poll()
			check("a day later", 2)
			// A renewal is checked as it is served.
			if err := tp.Reload(); err != nil {
				t.Fatal(err)
			}
			check("after Reload", 3)
		})
	}
}

// TestCertWarningsChain: TLS_CERT_FILE holding the leaf and an intermediate
// that has expired (a fullchain.pem left from an old renewal): the chain
// is served whole and clients refuse it, so the log says so, though the
// leaf itself is fine.
func TestCertWarningsChain(t *testing.T) {
	setCertPollInterval(t, time.Hour)
	now := time.Now()
	leaf, inter, leafKey := chainCerts(t, "expired intermediate", now.Add(-time.Hour), nil)
	pair := tls.Certificate{Certificate: [][]byte{leaf.Raw, inter.Raw}, PrivateKey: leafKey, Leaf: leaf}
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "fullchain.pem"), filepath.Join(dir, "privkey.pem")
	writePair(t, pair, certFile, keyFile)
	cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
	cfg.CertFile, cfg.KeyFile = certFile, keyFile
	tp := startProxy(t, cfg)
	if !strings.Contains(tp.Log.String(), "chain has a certificate outside its validity") ||
		!strings.Contains(tp.Log.String(), "expired intermediate") {
		t.Errorf("no warning for the expired intermediate:\n%s", tp.Log)
	}
	if strings.Contains(tp.Log.String(), "TLS_CERT_FILE's certificate") {
		t.Errorf("a warning about the leaf, which is fine:\n%s", tp.Log)
	}
}

// chainCerts is a leaf for 127.0.0.1 issued by an intermediate named cn,
// valid until interTo, issued by a root; the leaf names issuerURL as
// where its issuer's certificate is published (Authority Information
// Access), as a public CA's do.
func chainCerts(t *testing.T, cn string, interTo time.Time, issuerURL []string) (leaf, inter *x509.Certificate, leafKey *ecdsa.PrivateKey) {
	t.Helper()
	now := time.Now()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	rootKey, interKey, leafKey := key(), key(), key()
	ca := func(cn string, from, to time.Time) *x509.Certificate {
		return &x509.Certificate{SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: cn},
			NotBefore: from, NotAfter: to, IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	}
	rootTmpl := ca("test root", now.Add(-48*time.Hour), now.Add(48*time.Hour))
	root := signCert(t, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	inter = signCert(t, ca(cn, now.Add(-48*time.Hour), interTo), root, &interKey.PublicKey, rootKey)
	leaf = signCert(t, &x509.Certificate{SerialNumber: big.NewInt(now.UnixNano() + 1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(90 * 24 * time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IssuingCertificateURL: issuerURL}, inter, &leafKey.PublicKey, interKey)
	return leaf, inter, leafKey
}

// TestCertWithoutChain: certbot's cert.pem where fullchain.pem was meant.
// Browsers fetch the missing intermediate from the address the certificate
// names; Go's clients (Cells Sync, cec) and curl do not, and refuse the
// connection. The log says so at start; not for the full chain, nor for a
// certificate that names no such address (a private CA's, issued by a root
// its clients hold).
func TestCertWithoutChain(t *testing.T) {
	setCertPollInterval(t, time.Hour)
	const warning = "without the intermediate"
	leaf, inter, key := chainCerts(t, "R3", time.Now().Add(48*time.Hour), []string{"http://r3.i.lencr.org/"})
	private, _, privateKey := chainCerts(t, "private", time.Now().Add(48*time.Hour), nil)
	for _, tc := range []struct {
		name string
		pair tls.Certificate
		want bool
	}{
		{"cert.pem", tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}, true},
		{"fullchain.pem", tls.Certificate{Certificate: [][]byte{leaf.Raw, inter.Raw}, PrivateKey: key, Leaf: leaf}, false},
		{"private CA", tls.Certificate{Certificate: [][]byte{private.Raw}, PrivateKey: privateKey, Leaf: private}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "privkey.pem")
			writePair(t, tc.pair, certFile, keyFile)
			cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
			cfg.CertFile, cfg.KeyFile = certFile, keyFile
			tp := startProxy(t, cfg)
			if got := strings.Contains(tp.Log.String(), warning); got != tc.want {
				t.Errorf("warning %q logged: %v, want %v:\n%s", warning, got, tc.want, tp.Log)
			}
		})
	}
}

// TestReloadNothingServesTLS: with PROXY_TLS=off and no gRPC port, the
// certificate files are checked at start but serve nothing; Reload says
// that, not that TLS_CERT_FILE is missing when the operator set it.
func TestReloadNothingServesTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	writePair(t, newCert(t), certFile, keyFile)
	up := newUpstream(t, upTLS, &recorder{})
	cfg := testConfig(up)
	cfg.TLS, cfg.GRPCAddr, cfg.CertFile, cfg.KeyFile = false, "", certFile, keyFile
	tp := startProxy(t, cfg)
	if err := tp.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	log := tp.Log.String()
	if strings.Contains(log, "no TLS_CERT_FILE") || !strings.Contains(log, "nothing serves TLS") {
		t.Errorf("Reload's line does not say that nothing serves TLS:\n%s", log)
	}
}

// TestCertNameNotCovered: with PROXY_SERVER_NAMES empty, the first client
// that asks (by SNI) for a name TLS_CERT_FILE's certificate does not cover
// is logged, naming it: the one way the log can tell an operator that users
// reach the proxy by a name the certificate lacks. Once for each
// certificate served; a name it covers, no SNI (an IP address) or, with
// PROXY_SERVER_NAMES set (checked at start, other names refused), nothing.
func TestCertNameNotCovered(t *testing.T) {
	setCertPollInterval(t, time.Hour)
	const warning = "clients ask for a name that TLS_CERT_FILE's certificate does not cover"
	pair := func(t *testing.T, certFile, keyFile string, names ...string) {
		cert, err := SelfSigned(names...)
		if err != nil {
			t.Fatal(err)
		}
		writePair(t, cert, certFile, keyFile)
	}
	files := func(t *testing.T) (certFile, keyFile string) {
		dir := t.TempDir()
		return filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	}
	hello := func(t *testing.T, tp *testProxy, name string) {
		t.Helper()
		conn, err := tls.Dial("tcp", tp.Addr().String(), &tls.Config{ServerName: name, InsecureSkipVerify: true})
		if err != nil {
			t.Fatalf("handshake asking for %q: %v", name, err)
		}
		conn.Close()
	}
	warnings := func(tp *testProxy) []string {
		var w []string
		for _, l := range strings.Split(tp.Log.String(), "\n") {
			if strings.Contains(l, warning) {
				w = append(w, l)
			}
		}
		return w
	}

	t.Run("no PROXY_SERVER_NAMES", func(t *testing.T) {
		certFile, keyFile := files(t)
		pair(t, certFile, keyFile, "cells.example.com", "*.cells.example.com")
		cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
		cfg.CertFile, cfg.KeyFile = certFile, keyFile
		tp := startProxy(t, cfg)
		for _, name := range []string{"", "cells.example.com", "CELLS.example.com", "www.cells.example.com", "cells.example.com"} {
			hello(t, tp, name)
		}
		if w := warnings(tp); len(w) != 0 {
			t.Fatalf("names the certificate covers were logged: %q", w)
		}
		hello(t, tp, "files.example.com")
		hello(t, tp, "other.example.com")
		hello(t, tp, "files.example.com")
		w := warnings(tp)
		if len(w) != 1 || !strings.Contains(w[0], "files.example.com") || !strings.Contains(w[0], "cells.example.com") {
			t.Fatalf("want one warning naming files.example.com and the certificate's names, got %q", w)
		}
		// A new certificate, still without the name: once more.
		pair(t, certFile, keyFile, "cells.example.com")
		if err := tp.Reload(); err != nil {
			t.Fatal(err)
		}
		hello(t, tp, "cells.example.com")
		hello(t, tp, "files.example.com")
		hello(t, tp, "files.example.com")
		if w := warnings(tp); len(w) != 2 {
			t.Errorf("after a reload, want a second warning, got %d: %q", len(w), w)
		}
	})

	t.Run("PROXY_SERVER_NAMES", func(t *testing.T) {
		certFile, keyFile := files(t)
		pair(t, certFile, keyFile, "cells.example.com")
		cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
		cfg.CertFile, cfg.KeyFile = certFile, keyFile
		cfg.ServerNames = []string{"cells.example.com"}
		tp := startProxy(t, cfg)
		hello(t, tp, "files.example.com")
		if w := warnings(tp); len(w) != 0 {
			t.Errorf("a name outside PROXY_SERVER_NAMES was logged: %q", w)
		}
	})
}

// TestCertReloadEndsResumption: a client that resumes a session after a
// reload is served the new certificate: its ticket, issued with the old
// one, is refused and the handshake is a full one; tickets issued before
// a reload resume until it, those issued after it resume after it. The
// resumed session showed the replaced certificate for as long as the
// ticket lived.
func TestCertReloadEndsResumption(t *testing.T) {
	t.Parallel()
	old, err := SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	fresh, err := SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
	dir := t.TempDir()
	cfg.CertFile, cfg.KeyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	writePair(t, old, cfg.CertFile, cfg.KeyFile)
	tp := startProxy(t, cfg)
	roots := x509.NewCertPool()
	roots.AddCert(old.Leaf)
	roots.AddCert(fresh.Leaf)
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		writePair(t, old, cfg.CertFile, cfg.KeyFile)
		if err := tp.Reload(); err != nil {
			t.Fatal(err)
		}
		c := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: v, MaxVersion: v,
			ClientSessionCache: tls.NewLRUClientSessionCache(4), NextProtos: []string{"http/1.1"}}
		steps := []struct {
			reload    bool
			resumed   bool
			servesNew bool
		}{
			{false, false, false},
			{false, true, false},
			{true, false, true},
			{false, true, true},
		}
		for i, st := range steps {
			if st.reload {
				writePair(t, fresh, cfg.CertFile, cfg.KeyFile)
				if err := tp.Reload(); err != nil {
					t.Fatal(err)
				}
			}
			// A request read to its end: TLS 1.3 tickets come after the
			// handshake.
			conn, err := tls.Dial("tcp", tp.Addr().String(), c)
			if err != nil {
				t.Fatalf("%s, connection %d: %v", tls.VersionName(v), i, err)
			}
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
			io.ReadAll(conn)
			cs := conn.ConnectionState()
			conn.Close()
			if got := cs.DidResume; got != st.resumed {
				t.Errorf("%s, connection %d: resumed %v, want %v", tls.VersionName(v), i, got, st.resumed)
			}
			if got := cs.PeerCertificates[0].Equal(fresh.Leaf); got != st.servesNew {
				t.Errorf("%s, connection %d: the certificate seen is the reloaded one: %v, want %v", tls.VersionName(v), i, got, st.servesNew)
			}
		}
	}
}
