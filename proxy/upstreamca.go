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
	"io"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// upstreamCA keeps the pool read from CELLS_UPSTREAM_CA_FILE current, as
// certFiles keeps the public certificate: polled every certPollInterval and
// read again at SIGHUP, so that an operator who replaces Cells' certificate
// (and the file holding it, or its root) does not have to restart the
// proxy, whose every request would fail until then (502, certificate not
// trusted). A file that does not load leaves the current pool in place.
//
// Each tls.Config to Cells verifies with the current pool in
// VerifyConnection (configure), not with RootCAs: a tls.Config may not be
// modified once in use, and the transports hold theirs for the process's
// life.
//
// A connection to Cells made before the pool changed takes no new request
// after it: an operator replaces the file because the old root is no
// longer to be trusted, or to rotate it, and a pooled connection verified
// under the old root would otherwise carry requests for up to a minute
// (HTTP/1.1) or for good (a gRPC connection kept busy). At the change
// (changed, called after the new pool is in use), idle connections are
// closed, busy HTTP/1.1 ones when their exchange ends (gen, checked when
// one would go back to its pool), and gRPC ones take no new call and close
// when their last call ends, as after a GOAWAY. What is in flight goes on
// to its end, on the connection it started on: an upload, a websocket, a
// Cells Sync stream of hours, which a routine rotation must not cut. A
// restart cuts everything.
type upstreamCA struct {
	file string
	log  *slog.Logger
	pool atomic.Pointer[x509.CertPool]
	// gen counts the pools loaded after the first. It is raised after
	// the new pool is stored: a connection that read gen before its
	// handshake and finds it unchanged later was verified with the
	// current pool (or a newer one).
	gen atomic.Uint64
	// sessions are the TLS session caches of the tls.Configs to Cells,
	// emptied when the pool changes: a resumed session brings the
	// certificate of its first handshake, not the one Cells serves now.
	sessions []*upstreamSessions
	// changed are called after each change of pool, outside mu, to
	// retire the connections made before it; set up before the file is
	// watched, read-only after.
	changed []func()

	mu     sync.Mutex
	served [sha256.Size]byte // the content of the file the pool was made from
	failed [sha256.Size]byte // the content (or error) last refused, not to log it at every poll
}

// newUpstreamCA reads file; nil with no error when file is empty (the
// system roots, which are not reloaded).
func newUpstreamCA(file string, log *slog.Logger) (*upstreamCA, error) {
	if file == "" {
		return nil, nil
	}
	sum, pool, _, err := readUpstreamCA(file)
	if err != nil {
		return nil, err
	}
	a := &upstreamCA{file: file, log: log, served: sum}
	a.pool.Store(pool)
	return a, nil
}

// readUpstreamCA reads and parses a CA file; sum identifies the content
// read (or the error), n counts the certificates in the pool.
func readUpstreamCA(file string) (sum [sha256.Size]byte, pool *x509.CertPool, n int, err error) {
	data, err := os.ReadFile(file)
	if err != nil {
		err = fmt.Errorf("CELLS_UPSTREAM_CA_FILE must name a PEM bundle cells-proxy can read (Cells' certs/rootCA.pem): %w%s", err, readableBy(err))
		return sha256.Sum256([]byte(err.Error())), nil, 0, err
	}
	sum = sha256.Sum256(data)
	pool = x509.NewCertPool()
	// As AppendCertsFromPEM: other blocks, and certificates that do not
	// parse, are skipped; the certificates are counted for the log.
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type != "CERTIFICATE" || len(b.Headers) != 0 {
			continue
		}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil {
			pool.AddCert(c)
			n++
		}
	}
	switch {
	case n == 0:
		return sum, nil, 0, fmt.Errorf("CELLS_UPSTREAM_CA_FILE must name a PEM bundle (Cells' certs/rootCA.pem), got %q with no PEM certificate in it", file)
	case unfinishedPEM(data):
		// A bundle caught while being rewritten in place would lose
		// the roots after the cut.
		return sum, nil, 0, fmt.Errorf("CELLS_UPSTREAM_CA_FILE must name a PEM bundle (Cells' certs/rootCA.pem), got %q with a PEM block that is unfinished or does not decode (a file still being written?)", file)
	}
	return sum, pool, n, nil
}

// onChange has f called after each change of pool: f stops the
// connections made before it from taking new requests. Called before the
// file is watched.
func (a *upstreamCA) onChange(f ...func()) { a.changed = append(a.changed, f...) }

// generation is the number of the pool in use, which connections note
// before their handshake; 0 on a nil a (no CA file: nothing changes).
func (a *upstreamCA) generation() uint64 {
	if a == nil {
		return 0
	}
	return a.gen.Load()
}

// load reads the file and, if it changed and is good, verifies new
// connections with it and retires those made before. A poll's new content
// is used only if it reads the same after fileSettle.
func (a *upstreamCA) load(poll bool) (out outcome, n int, err error) {
	out, n, err = a.read(poll)
	if out == reloaded {
		// Outside mu: closing a connection may write to it (a GOAWAY),
		// which must not hold up a SIGHUP's check waiting on mu.
		for _, f := range a.changed {
			f()
		}
	}
	return out, n, err
}

func (a *upstreamCA) read(poll bool) (out outcome, n int, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	sum, pool, n, err := readUpstreamCA(a.file)
	switch {
	case err == nil && sum == a.served:
		// Back to the pool in use: the next breakage is news, even if
		// it is the same as the last one.
		a.failed = [sha256.Size]byte{}
		return unchanged, n, nil
	case err == nil && poll && !settled(sum, func() [sha256.Size]byte { again, _, _, _ := readUpstreamCA(a.file); return again }):
		return changing, 0, nil
	case err == nil:
		a.served, a.failed = sum, [sha256.Size]byte{}
		a.pool.Store(pool)
		a.gen.Add(1) // after the pool: see gen
		for _, s := range a.sessions {
			s.reset()
		}
		return reloaded, n, nil
	case sum == a.failed:
		return refusedAgain, 0, err
	}
	a.failed = sum
	return refused, 0, err
}

// poll is one periodic check. A file that does not load is logged once,
// at WARN (the pool in use still verifies Cells), until its content
// changes again.
func (a *upstreamCA) poll() {
	switch out, n, err := a.load(true); out {
	case reloaded:
		a.log.Info("CELLS_UPSTREAM_CA_FILE reloaded: new connections to Cells verify with it; those open take no new request", "trigger", "poll", "file", a.file, "certificates", n)
	case refused:
		a.log.Warn("CELLS_UPSTREAM_CA_FILE not reloaded, the CA read before keeps verifying Cells", "trigger", "poll", "err", err)
	case changing:
		a.log.Debug("CELLS_UPSTREAM_CA_FILE changed while being read (still being written?), checked again at the next poll", "trigger", "poll")
	}
}

// reload is SIGHUP's check: what it finds is logged whatever it is.
func (a *upstreamCA) reload() error {
	out, n, err := a.load(false)
	switch {
	case err != nil:
		a.log.Error("CELLS_UPSTREAM_CA_FILE not reloaded, the CA read before keeps verifying Cells", "trigger", "reload", "err", err)
		return err
	case out == reloaded:
		a.log.Info("CELLS_UPSTREAM_CA_FILE reloaded: new connections to Cells verify with it; those open take no new request", "trigger", "reload", "file", a.file, "certificates", n)
	default:
		a.log.Info("CELLS_UPSTREAM_CA_FILE unchanged", "trigger", "reload", "file", a.file)
	}
	return nil
}

// watch polls the file until ctx ends.
func (a *upstreamCA) watch(ctx context.Context) { pollFiles(ctx, a.poll) }

// configure makes c verify Cells' certificate for name with the current
// pool. It is what crypto/tls does with RootCAs (verifyServerCertificate:
// the same options, name and key usage), done in VerifyConnection, which
// Go calls on every handshake, resumed ones included, where
// VerifyPeerCertificate is skipped; InsecureSkipVerify only turns off the
// check against RootCAs that this replaces (the crypto/tls example
// "Config (VerifyConnection)"). Called before c is used.
func (a *upstreamCA) configure(c *tls.Config, name string) {
	s := newUpstreamSessions()
	a.mu.Lock()
	a.sessions = append(a.sessions, s)
	a.mu.Unlock()
	c.ClientSessionCache = s
	c.InsecureSkipVerify = true
	// crypto/tls's config.time(): Config.Time, set only by tests.
	now := time.Now
	if c.Time != nil {
		now = c.Time
	}
	// The last certificate verified for name, the pool that did, and
	// when its chain is valid.
	var last atomic.Pointer[verifiedLeaf]
	// c without a session cache: a connection whose resumed session is
	// refused is made again with it (resumeRefused). Cloned at the first
	// refusal: Clone is safe on a config in use.
	full := sync.OnceValue(func() *tls.Config {
		f := c.Clone()
		f.ClientSessionCache = nil
		return f
	})
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		certs := cs.PeerCertificates
		if len(certs) == 0 {
			return errors.New("tls: cells sent no certificate")
		}
		pool := a.pool.Load()
		t := now()
		if v := last.Load(); cs.DidResume && v != nil && v.pool == pool && bytes.Equal(v.raw, certs[0].Raw) && !t.Before(v.from) && !t.After(v.until) {
			// A resumed session brings the certificate of its first
			// handshake, verified then for name. crypto/tls checks,
			// before resuming, that a chain it verified then is still
			// valid now with RootCAs (loadSession,
			// anyValidVerifiedChain): so does this, with the chain
			// found for this certificate with the current pool,
			// sparing the chain's signature checks (about 0.1 ms) on
			// each new connection to Cells. A session verified with
			// another pool is verified again.
			return nil
		}
		opts := x509.VerifyOptions{Roots: pool, DNSName: name, CurrentTime: t}
		if len(certs) > 1 {
			opts.Intermediates = x509.NewCertPool()
			for _, c := range certs[1:] {
				opts.Intermediates.AddCert(c)
			}
		}
		chains, err := certs[0].Verify(opts)
		if err != nil {
			// The error crypto/tls returns: classify finds the
			// x509 error inside.
			err = &tls.CertificateVerificationError{UnverifiedCertificates: certs, Err: err}
			if cs.DidResume {
				return &resumeRefused{err: err, full: full}
			}
			return err
		}
		from, until := validity(chains)
		if v := last.Load(); v == nil || v.pool != pool || !bytes.Equal(v.raw, certs[0].Raw) || !v.from.Equal(from) || !v.until.Equal(until) {
			last.Store(&verifiedLeaf{pool: pool, raw: certs[0].Raw, from: from, until: until})
		}
		return nil
	}
}

// resumeRefused is VerifyConnection's error for a resumed session whose
// certificate the current pool does not accept. With RootCAs, crypto/tls
// would not have offered that session (loadSession skips one whose chains
// are no longer valid with RootCAs, anyValidVerifiedChain) and would have
// made a full handshake, which succeeds if Cells now serves a certificate
// the pool trusts. Here the session is only checked once resumed, and may
// still be in a cache emptied when the pool changed: a handshake verified
// with the old pool that ends just after stores it there (TLS 1.2: in the
// handshake; TLS 1.3: when its ticket arrives, at the connection's first
// read). So the dialers to Cells make the connection again, once, with
// full(): no session, a full handshake, verified as any other. crypto/tls
// has by then deleted the refused session (RFC 5077 §3.2). Only this
// failure costs anything: one more connection.
type resumeRefused struct {
	err  error // *tls.CertificateVerificationError
	full func() *tls.Config
}

func (e *resumeRefused) Error() string { return e.err.Error() }
func (e *resumeRefused) Unwrap() error { return e.err }

// fullHandshakeAfter is the config to dial Cells again with after err, a
// handshake's error, when err is a resumed session refused; nil otherwise.
func fullHandshakeAfter(err error) *tls.Config {
	var r *resumeRefused
	if errors.As(err, &r) {
		return r.full()
	}
	return nil
}

// validity is when the longest lasting of chains is valid: every
// certificate in it is, from the latest NotBefore to the earliest NotAfter.
// An intermediate or a root may end before the leaf it signed.
func validity(chains [][]*x509.Certificate) (from, until time.Time) {
	for i, chain := range chains {
		f, u := chain[0].NotBefore, chain[0].NotAfter
		for _, c := range chain[1:] {
			if c.NotBefore.After(f) {
				f = c.NotBefore
			}
			if c.NotAfter.Before(u) {
				u = c.NotAfter
			}
		}
		if i == 0 || u.After(until) {
			from, until = f, u
		}
	}
	return from, until
}

// verifiedLeaf is a certificate of Cells found good with pool, through a
// chain valid from from to until.
type verifiedLeaf struct {
	pool        *x509.CertPool
	raw         []byte
	from, until time.Time
}

// upstreamSessions is a client session cache that reset empties: one
// Get or Put more, an atomic load, per handshake.
type upstreamSessions struct {
	c atomic.Pointer[sessionLRU]
}

type sessionLRU struct{ tls.ClientSessionCache }

func newUpstreamSessions() *upstreamSessions {
	s := &upstreamSessions{}
	s.reset()
	return s
}

// reset drops every session. A handshake verified with the old pool that
// ends after it may still store its session in the new cache: resuming
// it later verifies it with the pool then current all the same, and a
// refusal makes a full handshake (resumeRefused).
func (s *upstreamSessions) reset() {
	// Resumption saves a full handshake when a pooled connection is
	// replaced.
	s.c.Store(&sessionLRU{tls.NewLRUClientSessionCache(64)})
}

func (s *upstreamSessions) Get(key string) (*tls.ClientSessionState, bool) {
	return s.c.Load().Get(key)
}

func (s *upstreamSessions) Put(key string, cs *tls.ClientSessionState) {
	s.c.Load().Put(key, cs)
}

// upstreamTransport is the http.Transport to Cells (uploads and other
// large or unsized bodies, the readiness probe), replaced by a clone at
// each change of CELLS_UPSTREAM_CA_FILE (renew), so that no new request
// goes on a connection made before it. http.Transport has no hook for a
// connection going back to its pool: the old Transport, which takes no
// new request, has its idle connections closed at the change and again
// each time one of its exchanges ends (ended), once the connection is
// back in its pool. An upload on it goes on to its end. (A connection the
// old Transport was still dialling for a request that took another one
// goes idle after the last exchange: it carries nothing, and
// IdleConnTimeout closes it.)
type upstreamTransport struct {
	cur atomic.Pointer[transportGen]
	mu  sync.Mutex // renew
}

// transportGen is one Transport of an upstreamTransport.
type transportGen struct {
	*http.Transport
	retired atomic.Bool // replaced: its connections are closed once idle
}

func newUpstreamTransport(t *http.Transport) *upstreamTransport {
	u := &upstreamTransport{}
	u.cur.Store(&transportGen{Transport: t})
	return u
}

// RoundTrip sends r with the current Transport. Its response body notes
// the exchange's end: one allocation per request on this path, which
// carries uploads (http.Transport makes a dozen), not the direct path's
// small ones.
func (u *upstreamTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	g := u.cur.Load()
	res, err := g.RoundTrip(r)
	if err != nil || res.Body == nil || res.Body == http.NoBody || res.StatusCode == http.StatusSwitchingProtocols {
		// Over: a response without a body is back in the pool
		// before RoundTrip returns (http.Transport's readLoop). A 101's
		// connection is the caller's.
		g.ended()
		return res, err
	}
	res.Body = &transportBody{ReadCloser: res.Body, g: g}
	return res, nil
}

// CloseIdleConnections closes the current Transport's idle connections;
// a replaced one's close as they become idle.
func (u *upstreamTransport) CloseIdleConnections() { u.cur.Load().CloseIdleConnections() }

// renew has new requests go to a clone of the current Transport, whose
// connections are dialled, and so verified, from now on.
func (u *upstreamTransport) renew() {
	u.mu.Lock()
	old := u.cur.Load()
	u.cur.Store(&transportGen{Transport: old.Clone()})
	u.mu.Unlock()
	// A request that took old just before the Store, and whose
	// exchange ends before retired is set, left its connection in the
	// pool: closed here.
	old.retired.Store(true)
	old.CloseIdleConnections()
}

// ended is called when an exchange on g ends.
func (g *transportGen) ended() {
	if g.retired.Load() {
		g.CloseIdleConnections()
	}
}

// transportBody is a response body of a transportGen. The exchange ends at
// the body's first error or at Close: at io.EOF, http.Transport has put the
// connection back in its pool before Read returns (readLoop's eofc); at
// Close before the end, it has closed it.
type transportBody struct {
	io.ReadCloser
	g    *transportGen
	done atomic.Bool // Close may come while a Read runs
}

func (b *transportBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && b.done.CompareAndSwap(false, true) {
		b.g.ended()
	}
	return n, err
}

func (b *transportBody) Close() error {
	err := b.ReadCloser.Close()
	if b.done.CompareAndSwap(false, true) {
		b.g.ended()
	}
	return err
}
