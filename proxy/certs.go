package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/kelseyhightower/envconfig"
)

// selfSignedValidity is how long a self-signed certificate is valid from
// its making.
const selfSignedValidity = 365 * 24 * time.Hour

// selfSignedRenewBefore is how long before its end the self-signed
// certificate is replaced by a new one (selfSignedRenewal).
const selfSignedRenewBefore = 30 * 24 * time.Hour

// SelfSigned makes an ECDSA P-256 certificate for names (host names or IP
// addresses), valid from an hour ago to a year from now. It is kept in memory only:
// the root filesystem may be read-only.
func SelfSigned(names ...string) (tls.Certificate, error) {
	return selfSigned(selfSignedValidity, names...)
}

// selfSigned is SelfSigned, valid for validity from now; tests make
// certificates near their end with it.
func selfSigned(validity time.Duration, names ...string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generating a key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generating a serial number: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "cells-proxy self-signed", Organization: []string{"cells-proxy"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		// Not a CA: Firefox refuses a server certificate that says it
		// is one (MOZILLA_PKIX_ERROR_CA_CERT_USED_AS_END_ENTITY), even
		// once the operator has made it trusted. Clients that trust
		// this certificate itself need no CA: Go, curl --cacert and
		// browsers' exceptions take a self-signed leaf as its own root.
		BasicConstraintsValid: true,
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if n != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("signing the certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// selfSignedRenewal keeps the self-signed certificate valid in a proxy that
// runs longer than its year (a long-lived container): the handshake that
// finds it within selfSignedRenewBefore of its end makes a new one for the
// same names, which every handshake then gets. Connections already open
// keep the old one, still valid. A client that was told to trust the old
// certificate itself (curl --cacert, a browser's exception) must be told
// again: the renewal is logged as a warning, as the start is.
type selfSignedRenewal struct {
	names []string
	cert  *atomic.Pointer[tls.Certificate] // the Server's, read by GetCertificate
	log   *slog.Logger

	// mu is taken only by handshakes that find the certificate near its
	// end, so that one makes the new certificate while the others wait
	// the millisecond it takes, and get it.
	mu    sync.Mutex
	retry time.Time // after a failure, no new attempt before this
}

// current returns the certificate a handshake serves in place of cert, the
// one just loaded from the Server: cert itself unless it is near its end.
// The common case costs a clock read and a comparison, no lock.
func (r *selfSignedRenewal) current(cert *tls.Certificate) *tls.Certificate {
	now := time.Now()
	if cert.Leaf.NotAfter.Sub(now) > selfSignedRenewBefore {
		return cert
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur := r.cert.Load(); cur != cert {
		return cur // renewed by a handshake that held mu before this one
	}
	if now.Before(r.retry) {
		return cert
	}
	fresh, err := SelfSigned(r.names...)
	if err != nil {
		// Not at every handshake: the old certificate serves until its
		// end, and a minute later the next handshake tries again.
		r.retry = now.Add(time.Minute)
		r.log.Error("the self-signed certificate nears its end and no new one could be made; retried in a minute", "err", err,
			"not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
		return cert
	}
	r.cert.Store(&fresh)
	r.log.Warn("no TLS_CERT_FILE: the self-signed certificate nears its end, serving a new one; clients told to trust the old one must be told to trust this one",
		"names", r.names, "serial", fresh.Leaf.SerialNumber.Text(16), "not_after", fresh.Leaf.NotAfter.UTC().Format(time.RFC3339),
		"old_not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	return &fresh
}

// readableBy is what to do about a file the process may not read: the image
// runs as uid 65532, and certbot and Cells write their keys and roots for
// root alone. For a directory where a file was named: Docker mounts one
// where the host file to mount does not exist. Empty for any other error.
func readableBy(err error) string {
	switch {
	case errors.Is(err, fs.ErrPermission):
		return fmt.Sprintf(": make it, and the folders above it, readable by uid %d, which cells-proxy runs as", os.Getuid())
	case errors.Is(err, syscall.EISDIR):
		return " (a volume whose host path does not exist is mounted as an empty directory: check the host path)"
	}
	return ""
}

// CheckFiles reads the files the environment names (CELLS_UPSTREAM_CA_FILE,
// TLS_CERT_FILE, TLS_KEY_FILE and the PROXY_ACME_WEBROOT directory), so that a start stopped by a bad
// variable reports them in the same run.
func CheckFiles() error {
	// The paths as Load takes them: one in quotes is reported there,
	// and the file it names here.
	var e env
	if err := envconfig.Process("", &e); err != nil {
		return nil // Load reports it
	}
	e.unpad()
	var errs []error
	if _, err := newUpstreamCA(e.UpstreamCAFile, nil); err != nil {
		errs = append(errs, err)
	}
	if cert, key := e.CertFile, e.KeyFile; cert != "" && key != "" {
		if _, _, err := (&certFiles{certFile: cert, keyFile: key}).read(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := checkACMEWebroot(e.ACMEWebroot); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
