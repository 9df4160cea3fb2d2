package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// direct forwards a request that fastPath accepts (no body, or a small one
// of known length; no upgrade, no Expect, no trailers): nearly every
// request of the web UI and Cells' REST API. It does what
// httputil.ReverseProxy with f.rewrite and http.Transport's request writer
// did for it, without their copies: ReverseProxy clones the request and its
// header map, deletes hop-by-hop and forwarding headers from the clone, sets
// the proxy's, and Request.Write sorts the result before writing it. Here
// the request to Cells is written straight from the client's request
// (outbound), and Cells' response header is handed to the client's
// response without a copy of each field (relay). The rules are
// ReverseProxy's, which still serves the other HTTP requests (bodies to
// stream, Expect: 100-continue): TestDirectMatchesReverseProxy compares
// the two. gRPC calls take a direct path of their own (callGRPC).
func (f *forwarder) direct(ex *exchange, r *http.Request) {
	out := &ex.out
	if err := out.init(f, r); err != nil {
		f.errorHandler(ex, r, err)
		return
	}
	if hasBody(r) {
		// Take the small body from the client before a connection to
		// Cells: none is held while a slow client sends, and head and
		// body leave in one write. A failed read (a client that stopped
		// half-way) is known to the exchange, which answers 400 rather
		// than 502; Cells sees nothing of such a request.
		buf := smallBodies.Get()
		defer smallBodies.Put(buf)
		out.body = (*buf)[:r.ContentLength]
		_, err := io.ReadFull(r.Body, out.body)
		r.Body.Close() // as http.Transport does, whatever happens
		if err != nil {
			f.errorHandler(ex, r, err)
			return
		}
	}
	res, err := f.httpUp.do(r, out, ex)
	if err != nil {
		f.errorHandler(ex, r, err)
		return
	}

	f.relay(ex, r, res)
}

// callGRPC forwards a gRPC call to the gRPC upstream. grpcUpstream writes
// the call's head from the client's request with ReverseProxy's rules (see
// encodeFields), so nothing is copied on the way: the calls of Cells Sync
// and of the gRPC gateway are all of this kind. The request body is the
// client's, closed by the stream when the call ends: a bidirectional
// stream that Cells ends before the client half-closes must not wait for
// the client's next message (grpcStream.Close).
func (f *forwarder) callGRPC(ex *exchange, r *http.Request) {
	res, err := f.startGRPC(r)
	if err != nil {
		f.errorHandler(ex, r, err)
		return
	}
	if s, ok := res.Body.(*grpcStream); ok {
		ex.grpc.Store(s)
	}
	f.relay(ex, r, res)
}

// startGRPC sends the call and returns Cells' response. Kept out of
// callGRPC so that the call's description is off the stack by the time
// relay writes the response (see relayHeader).
//
//go:noinline
func (f *forwarder) startGRPC(r *http.Request) (*http.Response, error) {
	call := &grpcCall{req: r, host: r.Host, path: requestPath(r), fw: f.forwardedFor(r)}
	if call.host == "" {
		call.host = f.grpcTarget.Host
	}
	if call.path == "" {
		call.path = "/"
	}
	if r.URL.RawQuery != "" || r.URL.ForceQuery {
		call.path += "?" + r.URL.RawQuery
	}
	return f.grpcUp.do(call)
}

// relay sends Cells' response to the client, as ReverseProxy with
// FlushInterval -1 does: hop-by-hop fields out, each of Cells' fields
// handed over without a copy, the header sent at once (exchange.FlushError
// leaves it for the first body bytes when it may: a declared length, a
// gRPC Trailers-Only answer), every chunk flushed as it comes (from Cells
// over HTTP/1.1: all that has come once the next read would wait, in
// writes of up to 63 KiB, download.go), then the trailers. A body that
// breaks off aborts the response, so the client cannot take it for
// complete; a gRPC call whose stream breaks ends with a gRPC status in the
// trailers instead (grpcBroken), unless its client is gone.
func (f *forwarder) relay(ex *exchange, r *http.Request, res *http.Response) {
	announced := relayHeader(ex.Header(), r, res)
	ex.WriteHeader(res.StatusCode)
	if res.Body == http.NoBody {
		return // the handler's end sends the header
	}
	// A stream (server-sent events, a zip built on the fly, a gRPC
	// stream): its header leaves now, not with the first bytes Cells
	// sends.
	ex.FlushError()
	if body, ok := res.Body.(*upBody); ok {
		// From Cells over HTTP/1.1: in writes of up to 63 KiB
		// (download.go).
		f.relayGathered(ex, r, res, body)
	} else {
		f.relayEach(ex, r, res)
	}
	res.Body.Close() // sets res.Trailer
	if len(res.Trailer) > 0 {
		// Chunked, so that the trailers can follow the body.
		ex.FlushError()
		relayTrailer(ex.Header(), res, announced)
	}
}

// relayEach copies a response body (a gRPC call's) to the client, each
// read in a write of its own, flushed.
func (f *forwarder) relayEach(ex *exchange, r *http.Request, res *http.Response) {
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	for {
		nr, rerr := res.Body.Read(buf[:])
		if nr > 0 {
			if _, werr := ex.Write(buf[:nr]); werr != nil {
				// The client is gone: abort, as ReverseProxy does.
				res.Body.Close()
				panic(http.ErrAbortHandler)
			}
			ex.FlushError() // every chunk as it comes (FlushInterval -1)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if f.endBroken(ex, r, res, rerr) {
				break
			}
			// Cells' body broke off: the client must not take the
			// response for complete, so the connection (or stream) is
			// aborted, as ReverseProxy does.
			res.Body.Close()
			panic(http.ErrAbortHandler)
		}
	}
}

// endBroken deals with a response body from Cells that broke off with err.
// A gRPC call ends with a gRPC status in the trailers (grpcBroken) and
// endBroken reports true; any other response is to be aborted, and a
// client still there is worth a line in the log.
//
//go:noinline
func (f *forwarder) endBroken(ex *exchange, r *http.Request, res *http.Response, err error) bool {
	if ex.kind == "grpc" {
		code, msg, ok := grpcBroken(r.Context(), err)
		if !ok {
			return false // the client is gone
		}
		if !errors.Is(err, errShutdown) {
			// Cells broke the call off: worth the line an HTTP response
			// gets, not the drain's own ending of it.
			f.logCutShort(r, err)
		}
		if res.Trailer == nil {
			res.Trailer = make(http.Header)
		}
		if res.Trailer.Get("Grpc-Status") == "" {
			res.Trailer.Set("Grpc-Status", strconv.Itoa(code))
			res.Trailer.Set("Grpc-Message", grpcEscape(msg))
		}
		return true
	}
	f.logCutShort(r, err)
	return false
}

// logCutShort warns of a response body that Cells cut short, unless the
// exchange itself ended it (the client gone, the idle watchdog, the
// drain), which the access line tells.
func (f *forwarder) logCutShort(r *http.Request, err error) {
	if r.Context().Err() == nil {
		f.log.Warn("upstream response cut short", "method", r.Method, "host", r.Host, "path", redactPath(r), "err", logErr(err))
	}
}

// cutShortBody is a response body on ReverseProxy's path, which logs a
// body that breaks off as the direct path does (httputil's own line named
// no request, and came at each idle cut too). r is the request to Cells:
// its method, Host, RequestURI, query and context are the client's.
type cutShortBody struct {
	io.ReadCloser
	f   *forwarder
	r   *http.Request
	res *http.Response
	ex  *exchange // the client's response, nil if not found
}

func (b *cutShortBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		// Read with the body's end. ReverseProxy adds the trailers to the
		// header map next.
		if b.ex != nil {
			clearTrailerNames(b.ex.Header(), b.res.Trailer)
		}
		dropForbiddenTrailers(b.res.Trailer)
	} else if err != nil {
		b.f.logCutShort(b.r, err)
	}
	return n, err
}

// dropForbiddenTrailers deletes from Cells' trailers the fields that may
// not be trailers (RFC 9110, section 6.5.1: Content-Length, Content-Type,
// Host...), and those whose name is not a field name (a space in it, which
// Go's reader takes: go.dev/issue/34540). net/http's servers and the front
// drop a forbidden field when Cells declares it in Trailer, but one Cells
// did not declare is passed on under http.TrailerPrefix, which net/http's
// HTTP/1 server and the front write after the body as it stands: a
// lenient client or cache could take it for the response's own. An
// invalid name, net/http's HTTP/2 server leaves out as it encodes the
// trailers, and when that leaves them empty it sends nothing, not even
// END_STREAM: the stream never ended (TestTrailerDeclaredNotSent). Called
// once the client's header has been cleared of the trailers' names
// (clearTrailerNames), so that a name dropped here cannot leave a header
// value behind to be sent as a trailer.
func dropForbiddenTrailers(t http.Header) {
	for k := range t {
		if !httpguts.ValidTrailerHeader(k) || !httpguts.ValidHeaderFieldName(k) {
			delete(t, k)
		}
	}
}

// relayHeader moves Cells' response header fields to h, the client's
// response header, and returns how many trailers Cells announced. Kept out
// of relay, as relayTrailer is: their map iterators would make relay's
// stack frame about three times larger, and an HTTP/2 handler's stack is
// grown (copied) when the header is written below it.
//
//go:noinline
func relayHeader(h http.Header, r *http.Request, res *http.Response) int {
	removeHopByHop(res.Header)
	dropBodilessLength(res)
	for k, vv := range res.Header {
		if prev, ok := h[k]; ok {
			h[k] = append(prev, vv...)
		} else {
			h[k] = vv // the response is ours alone: no copy
		}
	}
	if _, ok := h["Date"]; !ok && r.ProtoMajor == 2 {
		h["Date"] = httpDate()
	}
	announced := len(res.Trailer)
	if announced > 0 {
		keys := make([]string, 0, announced)
		for k := range res.Trailer {
			keys = append(keys, k)
		}
		h.Add("Trailer", strings.Join(keys, ", "))
	}
	return announced
}

// dropBodilessLength drops the Content-Length of a 204 or 304 from Cells:
// no content follows either (RFC 9110, sections 6.4.1 and 8.6). net/http's
// HTTP/1 server leaves the field out of both; its HTTP/2 server passes it
// on, and Go's HTTP/2 client (rclone, cec, Cells Sync) then takes the
// empty response for a body cut short ("unexpected EOF").
func dropBodilessLength(res *http.Response) {
	if res.StatusCode == http.StatusNoContent || res.StatusCode == http.StatusNotModified {
		delete(res.Header, "Content-Length")
	}
}

// relayTrailer moves Cells' trailers to h, as ReverseProxy does: under
// their own names when Cells announced them all, else with
// http.TrailerPrefix.
//
//go:noinline
func relayTrailer(h http.Header, res *http.Response, announced int) {
	clearTrailerNames(h, res.Trailer)
	dropForbiddenTrailers(res.Trailer)
	if len(res.Trailer) == announced {
		copyHeader(h, res.Trailer)
		return
	}
	for k, vv := range res.Trailer {
		k = http.TrailerPrefix + k
		for _, v := range vv {
			h.Add(k, v)
		}
	}
}

// clearTrailerNames deletes from h, the client's response header, the
// names Cells declared or sent as trailers, before its trailers go in.
// At the handler's end net/http's servers and the front send, for a
// declared trailer, whatever h holds under its name, and add the values
// under http.TrailerPrefix: a field Cells sent in its header as well
// (X-Foo: a, then X-Foo: b as a trailer) reached the client with a and b
// in its trailers. The header has left by then (net/http's servers copy
// h at WriteHeader; relay flushes the front's before the trailers), so
// this changes the trailers only, as http.ResponseWriter's Header says.
func clearTrailerNames(h, trailer http.Header) {
	for k := range trailer {
		delete(h, k)
	}
}

// outbound writes the request Cells receives for a client's request r:
//
//   - r's method, its request-target exactly as the client sent it (for an
//     absolute-form target, its path and query; setTarget's rule), HTTP/1.1;
//   - Host as the client sent it, with http.Request.Write's checks and
//     treatment (no IPv6 zone, Cells' own when r has none; a Host outside
//     ASCII, which net/http's writer turns to punycode, is not taken here:
//     see fastPath);
//   - r's header fields, except the hop-by-hop ones (RFC 9110, section
//     7.6.1, and those named in Connection), the client's Forwarded,
//     X-Forwarded-*, X-Real-IP (the proxy's replace them, see
//     forwardedFor), and the fields net/http's writer writes itself;
//     values trimmed, as net/http writes them; the first User-Agent only,
//     and none when the client sent none;
//   - TE: trailers when the client said it, as ReverseProxy passes it on;
//   - Content-Length as net/http's writer sets it (0 for a POST, PUT or
//     PATCH without a body), then the body.
//
// Fields are not sorted: their order across names has no meaning (RFC
// 9110, section 5.3), and the values of one name keep theirs.
type outbound struct {
	r      *http.Request
	host   string
	path   string
	query  bool // a '?' follows the path
	fw     forwarded
	te     bool
	conn   []string // the client's Connection header
	body   []byte
	length string // Content-Length, "" for none
}

func (o *outbound) init(f *forwarder, r *http.Request) error {
	*o = outbound{r: r, path: requestPath(r), query: r.URL.RawQuery != "" || r.URL.ForceQuery}
	if o.path == "" {
		o.path = "/" // a target such as "a:" names no path (URL.RequestURI's rule)
	}
	// What http.Transport and Request.Write refuse to send.
	if !httpguts.ValidHeaderFieldName(r.Method) {
		return fmt.Errorf("net/http: invalid method %q", r.Method)
	}
	host := r.Host
	if host == "" {
		host = f.httpTarget.Host
	}
	if !httpguts.ValidHostHeader(host) {
		return errors.New("http: invalid Host header")
	}
	o.host = removeZone(host)
	if hasCTL(o.path) || hasCTL(r.URL.RawQuery) {
		return errors.New("net/http: can't write control character in Request.URL")
	}
	if err := checkHeader(r.Header); err != nil {
		return err
	}
	o.conn = r.Header["Connection"]
	o.te = httpguts.HeaderValuesContainsToken(r.Header["Te"], "trailers")
	o.fw = f.forwardedFor(r)
	switch {
	case r.ContentLength > 0:
		o.length = strconv.FormatInt(r.ContentLength, 10)
	case r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch:
		o.length = "0"
	}
	return nil
}

func (o *outbound) writeTo(w *bufio.Writer) error {
	r := o.r
	w.WriteString(r.Method)
	w.WriteByte(' ')
	w.WriteString(o.path)
	if o.query {
		w.WriteByte('?')
		w.WriteString(r.URL.RawQuery)
	}
	w.WriteString(" HTTP/1.1\r\nHost: ")
	w.WriteString(o.host)
	w.WriteString("\r\n")
	if ua := r.Header["User-Agent"]; len(ua) > 0 && !o.listedInConnection("User-Agent") {
		if v := textproto.TrimString(ua[0]); v != "" {
			writeField(w, "User-Agent", v)
		}
	}
	if o.length != "" {
		writeField(w, "Content-Length", o.length)
	}
	for k, vv := range r.Header {
		if notForwarded(k) || o.listedInConnection(k) {
			continue
		}
		for _, v := range vv {
			writeField(w, k, textproto.TrimString(v))
		}
	}
	if o.te {
		w.WriteString("Te: trailers\r\n")
	}
	if o.fw.ok {
		writeField(w, "X-Forwarded-For", o.fw.xff)
		writeField(w, "X-Real-Ip", o.fw.realIP)
		writeField(w, "X-Forwarded-Proto", o.fw.proto)
		writeField(w, "X-Forwarded-Host", o.fw.host)
	}
	w.WriteString("\r\n")
	_, err := w.Write(o.body) // bufio.Writer's error sticks: any write's
	return err
}

func writeField(w *bufio.Writer, k, v string) {
	w.WriteString(k)
	w.WriteString(": ")
	w.WriteString(v)
	w.WriteString("\r\n")
}

// notForwarded reports whether a client's header field (canonical name,
// as net/http's servers give them) stays out of the request to Cells: the
// hop-by-hop fields (hopHeaders, written out here as a switch for the hot
// path; TestNotForwardedCoversHopHeaders keeps the two in step), the
// forwarding fields the proxy replaces, and those the writer writes itself.
func notForwarded(k string) bool {
	switch k {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
		"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
		"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-Ip",
		"Host", "User-Agent", "Content-Length":
		return true
	}
	return false
}

// listedInConnection reports whether the client named k in its Connection
// header: a hop-by-hop field of its own (RFC 9110, section 7.6.1).
func (o *outbound) listedInConnection(k string) bool {
	for _, v := range o.conn {
		for name := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(textproto.TrimString(name), k) {
				return true
			}
		}
	}
	return false
}

// removeZone drops the zone of an IPv6 literal host ("[fe80::1%en0]:80"),
// as net/http's request writer does.
func removeZone(host string) string {
	if !strings.HasPrefix(host, "[") {
		return host
	}
	i := strings.LastIndex(host, "]")
	if i < 0 {
		return host
	}
	j := strings.LastIndex(host[:i], "%")
	if j < 0 {
		return host
	}
	return host[:j] + host[i:]
}

func hasCTL(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < ' ' || s[i] == 0x7f {
			return true
		}
	}
	return false
}
