package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// certPollInterval is how often TLS_CERT_FILE and TLS_KEY_FILE are read to
// notice a renewed certificate. Reading two small files this often costs
// nothing, and it needs no inotify: certbot replaces symlinks and
// cert-manager swaps a "..data" symlink directory, which a watch on the file
// itself would miss. Tests shorten it.
var certPollInterval = 5 * time.Second

// fileSettle is how long a poll that finds new content in a watched file
// (TLS_CERT_FILE, TLS_KEY_FILE, CELLS_UPSTREAM_CA_FILE) waits before it
// reads the files again: only content read the same both times is used. A
// writer that writes a file in parts can be caught between two of its
// writes with a file that loads: cat cert.pem chain.pem > fullchain.pem
// writes the leaf, then the chain, and the leaf alone would be served, which
// Go's clients (Cells Sync) and curl refuse for want of the intermediate; a
// CA bundle would lose the roots after the cut. A SIGHUP, which the
// operator sends once the files are written, does not wait.
var fileSettle = 200 * time.Millisecond

// testHookSettle, if not nil, runs after a poll's first read of new
// content, before the second.
var testHookSettle func()

// settled waits fileSettle and reports whether sum, the content a poll
// read, is what again reads now.
func settled(sum [sha256.Size]byte, again func() [sha256.Size]byte) bool {
	if testHookSettle != nil {
		testHookSettle()
	}
	time.Sleep(fileSettle)
	return again() == sum
}

// certFiles keeps the certificate served from TLS_CERT_FILE and TLS_KEY_FILE
// current. A new pair replaces the old one only once it parses and its key
// matches its certificate: a half-written or mismatched pair is refused with
// an error in the log (a warning first, if a poll found it), and the old
// certificate keeps serving. Connections
// already open are not touched; new handshakes get the new certificate.
type certFiles struct {
	certFile, keyFile string
	names             []string     // PROXY_SERVER_NAMES, which the certificate should cover
	checked           atomic.Int64 // unix time of the last check of the served certificate's warnings
	log               *slog.Logger
	cert              *atomic.Pointer[tls.Certificate] // the Server's, read by GetCertificate

	// With PROXY_SERVER_NAMES empty, the names clients ask for (SNI) are
	// checked against the certificate served instead (checkName).
	nameOK     atomic.Pointer[nameSeen]        // the last name asked for that the served certificate covers
	nameWarned atomic.Pointer[tls.Certificate] // the certificate a name it lacks was logged for

	mu     sync.Mutex
	served [sha256.Size]byte // the content of the pair being served
	failed [sha256.Size]byte // the content of the last pair refused, not to log it at every poll
	warned bool              // failed was seen by one poll and logged at WARN only
}

// outcome is what a check of the files did.
type outcome int

const (
	unchanged    outcome = iota // same content as served
	reloaded                    // a new pair is served
	refused                     // a new pair did not load
	refusedOnce                 // a new pair did not load at a poll that followed a good check
	refusedAgain                // the pair refused at the previous check, still
	changing                    // new content, changed again while it was read: the next poll decides
)

// load reads both files and, if they make a usable pair, serves it. With
// force the pair is parsed even when its content is the one served (SIGHUP).
func (c *certFiles) load(force bool) (outcome, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sum, cert, err := c.read()
	if err == nil && sum == c.served && !force {
		// The files are back to the served pair: the next breakage is
		// news, even if it is the same as the last one.
		c.failed, c.warned = [sha256.Size]byte{}, false
		return unchanged, nil
	}
	if err == nil && !force && !settled(sum, func() [sha256.Size]byte { again, _, _ := c.read(); return again }) {
		return changing, nil
	}
	if err == nil {
		c.served, c.failed, c.warned = sum, [sha256.Size]byte{}, false
		c.cert.Store(cert)
		return reloaded, nil
	}
	switch {
	case !force && c.failed == [sha256.Size]byte{}:
		// A renewal that writes the certificate and then the key
		// (cp, certbot repointing two symlinks) can be caught in
		// between by a poll: the next poll decides.
		c.failed, c.warned = sum, true
		return refusedOnce, err
	case force || c.warned || sum != c.failed:
		c.failed, c.warned = sum, false
		return refused, err
	}
	return refusedAgain, err
}

// read loads the pair; sum identifies the content read (or the error).
func (c *certFiles) read() (sum [sha256.Size]byte, cert *tls.Certificate, err error) {
	certPEM, errCert := os.ReadFile(c.certFile)
	keyPEM, errKey := os.ReadFile(c.keyFile)
	if errCert != nil {
		errCert = fmt.Errorf("TLS_CERT_FILE must name a file cells-proxy can read: %w%s", errCert, readableBy(errCert))
	}
	if errKey != nil {
		errKey = fmt.Errorf("TLS_KEY_FILE must name a file cells-proxy can read: %w%s", errKey, readableBy(errKey))
	}
	if err := errors.Join(errCert, errKey); err != nil {
		return sha256.Sum256([]byte(err.Error())), nil, err
	}
	// The length of the first file is hashed too, so that moving bytes
	// from one file to the other changes the sum.
	h := sha256.New()
	fmt.Fprintf(h, "%d\n", len(certPEM))
	h.Write(certPEM)
	h.Write(keyPEM)
	h.Sum(sum[:0])
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		err = pairMistake(certPEM, keyPEM, err)
	}
	if err == nil && pair.Leaf == nil {
		err = errors.New("no certificate")
	}
	if err == nil && unfinishedPEM(certPEM) {
		// X509KeyPair stops at a block with no END line: a chain file
		// caught while being written would be served as its leaf alone,
		// and clients would find no intermediate.
		err = errors.New("a PEM block in the certificate file is unfinished or does not decode (a file still being written?)")
	}
	if err != nil {
		return sum, nil, fmt.Errorf("TLS_CERT_FILE and TLS_KEY_FILE must hold a PEM certificate (chain) and its private key, got %q and %q: %w", c.certFile, c.keyFile, err)
	}
	return sum, &pair, nil
}

// pairMistake is err, X509KeyPair's, or what an operator did that caused it
// when that can be told: crypto/tls says "failed to parse private key" of a
// key under a passphrase (openssl req -newkey without -noenc writes one) and
// "private key does not match public key" of a chain whose leaf is not first.
func pairMistake(certPEM, keyPEM []byte, err error) error {
	for rest := keyPEM; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type == "ENCRYPTED PRIVATE KEY" || strings.HasSuffix(b.Type, "PRIVATE KEY") && strings.Contains(b.Headers["Proc-Type"], "ENCRYPTED") {
			return errors.New("the private key is protected by a passphrase, which cells-proxy cannot ask for: write it without one (openssl pkey -in key.pem -out key-nopass.pem) and keep that file readable only by cells-proxy")
		}
	}
	n := 0
	for rest := certPEM; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if n++; n > 1 && keyMatches(b, keyPEM) {
			return fmt.Errorf("the private key belongs to certificate %d of the file, not to the first: the server's certificate must come first, then the certificates that issued it", n)
		}
	}
	return err
}

// keyMatches reports whether keyPEM holds the private key of the
// certificate in b.
func keyMatches(b *pem.Block, keyPEM []byte) bool {
	_, err := tls.X509KeyPair(pem.EncodeToMemory(b), keyPEM)
	return err == nil
}

// unfinishedPEM reports whether data has a BEGIN line that no complete,
// decodable PEM block follows.
func unfinishedPEM(data []byte) bool {
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			return bytes.Contains(data, []byte("-----BEGIN"))
		}
	}
}

// poll is one periodic check. Files found broken are a warning the first
// time, an error if the next poll finds them broken still; a pair that
// stays broken is logged once.
func (c *certFiles) poll() {
	switch out, err := c.load(false); out {
	case reloaded:
		c.logServed("poll")
	case refusedOnce:
		c.log.Warn("TLS certificate files do not load (a renewal being written?), the current one keeps serving; checked again at the next poll",
			"trigger", "poll", "err", err)
	case refused:
		c.log.Error("TLS certificate not reloaded, the current one keeps serving", "trigger", "poll", "err", err)
	case changing:
		c.log.Debug("TLS certificate files changed while being read (still being written?), checked again at the next poll", "trigger", "poll")
	default:
		// A certificate served for weeks reaches its end while no renewal
		// came: say so once a day.
		if time.Since(time.Unix(c.checked.Load(), 0)) >= certCheckInterval {
			c.warn(c.cert.Load())
		}
	}
}

// certCheckInterval is how often an unchanged certificate is checked again.
const certCheckInterval = 24 * time.Hour

// logServed logs the certificate now served; trigger is start, poll or
// reload. What browsers and Cells Sync would refuse in it is logged too: the
// pair is served all the same (the files are the operator's), but the log
// says why clients fail.
func (c *certFiles) logServed(trigger string) {
	leaf := c.cert.Load().Leaf
	msg := "TLS certificate reloaded"
	if trigger == "start" {
		msg = "TLS certificate loaded"
	}
	c.log.Info(msg, "trigger", trigger, "file", c.certFile, "subject", leaf.Subject.String(),
		"serial", leaf.SerialNumber.Text(16), "not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	c.warn(c.cert.Load())
}

// warn logs certWarnings for the served pair: its leaf, and the
// intermediates served with it, whose expiry clients refuse as well.
func (c *certFiles) warn(cert *tls.Certificate) {
	now := time.Now()
	c.checked.Store(now.Unix())
	leaf := cert.Leaf
	for _, w := range certWarnings(leaf, c.names, now) {
		c.log.Warn(w, "file", c.certFile, "not_before", leaf.NotBefore.UTC().Format(time.RFC3339),
			"not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if len(cert.Certificate) == 1 && len(leaf.IssuingCertificateURL) > 0 && !bytes.Equal(leaf.RawIssuer, leaf.RawSubject) {
		// The leaf alone, from a CA that publishes its issuer: certbot's
		// cert.pem where fullchain.pem was meant.
		c.log.Warn("TLS_CERT_FILE holds the certificate without the intermediate that issued it: browsers fetch that, but Cells Sync, cec and curl refuse the connection; give the full chain (certbot: fullchain.pem, not cert.pem)",
			"file", c.certFile, "issuer", leaf.Issuer.String(), "issuer_url", leaf.IssuingCertificateURL[0])
	}
	for _, der := range cert.Certificate[1:] {
		ca, err := x509.ParseCertificate(der)
		if err != nil || now.Before(ca.NotAfter) && now.After(ca.NotBefore) {
			continue
		}
		c.log.Warn("TLS_CERT_FILE's chain has a certificate outside its validity: clients will refuse it; renew the chain",
			"file", c.certFile, "subject", ca.Subject.String(), "not_before", ca.NotBefore.UTC().Format(time.RFC3339),
			"not_after", ca.NotAfter.UTC().Format(time.RFC3339))
	}
}

// certWarnings lists what clients would refuse in a certificate at now:
// outside its validity, or not covering one of the public names.
func certWarnings(leaf *x509.Certificate, names []string, now time.Time) []string {
	var w []string
	switch {
	case now.After(leaf.NotAfter):
		w = append(w, "TLS_CERT_FILE's certificate has expired: clients will refuse it; renew it")
	case now.Before(leaf.NotBefore):
		w = append(w, "TLS_CERT_FILE's certificate is not valid yet: clients will refuse it; check the clock")
	case leaf.NotAfter.Sub(now) < 7*24*time.Hour:
		w = append(w, "TLS_CERT_FILE's certificate expires in less than 7 days: check that its renewal runs")
	}
	for _, n := range names {
		if leaf.VerifyHostname(n) != nil {
			w = append(w, fmt.Sprintf("TLS_CERT_FILE's certificate does not cover %s, a name in PROXY_SERVER_NAMES: clients asking for it will refuse it", n))
		}
	}
	return w
}

// nameSeen is a name clients asked for and the certificate served then.
type nameSeen struct {
	cert *tls.Certificate
	name string
}

// checkName is called at each handshake with the name the client asks for
// (SNI) and the certificate it gets. With PROXY_SERVER_NAMES set, the start
// checks that the certificate covers them; without, a client is the first
// to learn which name users reach. A name the certificate does not cover
// is logged once for each certificate served: browsers, Cells Sync and
// curl refuse the connection. A name it covers is kept, so the handshakes
// that follow compare a pointer and a string.
func (c *certFiles) checkName(name string, cert *tls.Certificate) {
	if name == "" || len(c.names) > 0 || c.nameWarned.Load() == cert {
		return
	}
	if ok := c.nameOK.Load(); ok != nil && ok.cert == cert && ok.name == name {
		return
	}
	if cert.Leaf.VerifyHostname(name) == nil {
		c.nameOK.Store(&nameSeen{cert, name})
		return
	}
	if c.nameWarned.Swap(cert) == cert {
		return
	}
	c.log.Warn("clients ask for a name that TLS_CERT_FILE's certificate does not cover: they will refuse it; if users reach the proxy by that name, serve a certificate for it (logged once for each certificate, for the first such name)",
		"server_name", name, "file", c.certFile, "certificate_names", strings.Join(cert.Leaf.DNSNames, ","))
}

// watch polls the files until ctx ends.
func (c *certFiles) watch(ctx context.Context) { pollFiles(ctx, c.poll) }

// pollFiles calls poll every certPollInterval until ctx ends: the public
// certificate's files and CELLS_UPSTREAM_CA_FILE are watched alike.
func pollFiles(ctx context.Context, poll func()) {
	t := time.NewTicker(certPollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			poll()
		}
	}
}

// Reload reads TLS_CERT_FILE and TLS_KEY_FILE again, as SIGHUP asks: new
// handshakes get the new certificate, open connections keep theirs. A pair
// that does not load is refused, logged and returned, and the current
// certificate keeps serving. With the self-signed certificate there is
// nothing to reload. CELLS_UPSTREAM_CA_FILE is read again too, the same
// way: new connections to Cells verify with it, and those made before
// take no new request.
func (s *Server) Reload() error {
	err := s.reloadCert()
	if s.fwd.ca != nil {
		err = errors.Join(err, s.fwd.ca.reload())
	}
	return err
}

// reloadCert is Reload for TLS_CERT_FILE and TLS_KEY_FILE.
func (s *Server) reloadCert() error {
	switch {
	case s.certFiles == nil && s.cfg.CertFile != "":
		s.log.Info("TLS certificate not reloaded: nothing serves TLS (PROXY_TLS=off and no PYDIO_GRPC_EXTERNAL)")
		return nil
	case s.certFiles == nil:
		s.log.Info("TLS certificate not reloaded: no TLS_CERT_FILE")
		return nil
	}
	if _, err := s.certFiles.load(true); err != nil {
		s.log.Error("TLS certificate not reloaded, the current one keeps serving", "trigger", "reload", "err", err)
		return err
	}
	s.certFiles.logServed("reload")
	return nil
}
