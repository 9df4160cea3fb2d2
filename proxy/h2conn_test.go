package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// startH2Proxy is a proxy with both TLS ports in front of rec.
func startH2Proxy(t *testing.T, rec *recorder) *testProxy {
	cfg := testConfig(newUpstream(t, upTLS, rec))
	cfg.GRPCAddr = "127.0.0.1:0"
	return startProxy(t, cfg)
}

// TestH2ConnectionHeaders is h2spec http2/8.1.2.2/1 and /2 and more: a
// header block with a connection-specific field, or TE other than
// "trailers", is a malformed request (RFC 9113 §8.2.2): its stream is reset
// with PROTOCOL_ERROR, nothing reaches Cells, and the connection serves its
// next requests, whose fields may come from the HPACK dynamic table the
// malformed blocks filled. net/http alone answers such requests with 400.
func TestH2ConnectionHeaders(t *testing.T) {
	rec := &recorder{}
	tp := startH2Proxy(t, rec)
	for port, addr := range tlsPorts(tp) {
		t.Run(port, func(t *testing.T) {
			c := dialH2At(t, tp, addr)
			get := func(path string, kv ...string) []string { return h2Fields("GET", addr, "/"+port+path, kv...) }
			// Writes outside frameConn's helpers hold its lock.
			write := func(f func()) {
				c.wmu.Lock()
				defer c.wmu.Unlock()
				f()
			}
			const reset, ok = "RST_STREAM PROTOCOL_ERROR", ":status 200"

			steps := []struct {
				name string
				send func(id uint32) error
				want string
			}{
				{"connection", func(id uint32) error {
					return c.request(id, get("/bad", "x-trace", "one", "connection", "keep-alive")...)
				}, reset},
				// Both fields now come from the dynamic table.
				{"indexed connection", func(id uint32) error {
					return c.request(id, get("/bad", "x-trace", "one", "connection", "keep-alive")...)
				}, reset},
				{"indexed x-trace", func(id uint32) error { return c.request(id, get("/good", "x-trace", "one")...) }, ok},
				{"keep-alive", func(id uint32) error { return c.request(id, get("/bad", "keep-alive", "timeout=5")...) }, reset},
				{"proxy-connection", func(id uint32) error { return c.request(id, get("/bad", "proxy-connection", "close")...) }, reset},
				{"transfer-encoding", func(id uint32) error { return c.request(id, get("/bad", "transfer-encoding", "chunked")...) }, reset},
				{"upgrade", func(id uint32) error { return c.request(id, get("/bad", "upgrade", "websocket")...) }, reset},
				{"te gzip", func(id uint32) error { return c.request(id, get("/bad", "te", "trailers, deflate")...) }, reset},
				{"two te", func(id uint32) error { return c.request(id, get("/bad", "te", "trailers", "te", "trailers")...) }, reset},
				{"te trailers", func(id uint32) error { return c.request(id, get("/good", "te", "trailers")...) }, ok},
				{"padded, with priority, over CONTINUATION", func(id uint32) (err error) {
					write(func() {
						b := c.block(get("/bad", "te", "gzip", "x-filler", "0123456789abcdef")...)
						err = errors.Join(
							c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b[:len(b)/2], EndStream: true,
								PadLength: 7, Priority: http2.PriorityParam{Weight: 9}}),
							c.fr.WriteContinuation(id, true, b[len(b)/2:]))
					})
					return err
				}, reset},
				{"in trailers", func(id uint32) (err error) {
					write(func() {
						err = errors.Join(
							c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.block(h2Fields("POST", addr, "/"+port+"/trailers")...), EndHeaders: true}),
							c.fr.WriteData(id, false, []byte("body")),
							c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.block("transfer-encoding", "chunked"), EndStream: true, EndHeaders: true}))
					})
					return err
				}, reset},
				{"after all that", func(id uint32) error { return c.request(id, get("/good", "x-trace", "one")...) }, ok},
			}
			for i, step := range steps {
				id := uint32(2*i + 1)
				if err := step.send(id); err != nil {
					t.Fatal(err)
				}
				if got := c.answer(t, id).String(); got != step.want {
					t.Errorf("%s (stream %d): got %s, want %s", step.name, id, got, step.want)
				}
			}
			var good []string
			for _, r := range rec.all() {
				if r.RequestURI == "/"+port+"/bad" {
					t.Errorf("a malformed request reached the upstream: %v", r.Header)
				}
				if r.RequestURI == "/"+port+"/good" {
					good = append(good, r.Header.Get("X-Trace"))
				}
			}
			if want := []string{"one", "", "one"}; !slices.Equal(good, want) {
				t.Errorf("the upstream saw X-Trace %q on the good requests, want %q", good, want)
			}
		})
	}
}

// TestH2OversizedHeaders: a request whose header list is over the server's
// limit as decoded (HPACK lets 30 one-byte references to a 4 KB
// dynamic-table entry stand for 120 KB) is answered 431 on its stream, and
// the connection serves the next request, whether or not the block also
// carries a connection-specific field. With one, h2conn used to append its
// CONTINUATION to the block net/http had already cut at the limit, which
// net/http takes for a block going on past it: GOAWAY PROTOCOL_ERROR, and
// every other stream of the client on that connection gone with it.
func TestH2OversizedHeaders(t *testing.T) {
	tp := startH2Proxy(t, &recorder{})
	for port, addr := range tlsPorts(tp) {
		for _, malformed := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/connection-field=%v", port, malformed), func(t *testing.T) {
				c := dialH2At(t, tp, addr)
				big := strings.Repeat("a", 4000)
				if err := c.request(1, h2Fields("GET", addr, "/seed", "x-big", big)...); err != nil {
					t.Fatal(err)
				}
				if got := c.answer(t, 1).String(); got != ":status 200" {
					t.Fatalf("request filling the dynamic table: got %s, want :status 200", got)
				}
				var kv []string
				for range 30 {
					kv = append(kv, "x-big", big)
				}
				if malformed {
					kv = append(kv, "connection", "close")
				}
				if err := c.request(3, h2Fields("GET", addr, "/huge", kv...)...); err != nil {
					t.Fatal(err)
				}
				if got := c.answer(t, 3).String(); got != ":status 431" {
					t.Errorf("oversized request: got %s, want :status 431", got)
				}
				if err := c.request(5, h2Fields("GET", addr, "/after")...); err != nil {
					t.Fatal(err)
				}
				if got := c.answer(t, 5).String(); got != ":status 200" {
					t.Errorf("next request on the connection: got %s, want :status 200", got)
				}
			})
		}
		// At the limit, to the byte, with a connection field: h2conn's
		// count must be net/http's (h2MaxHeaderList). Just within it,
		// with room for h2conn's CONTINUATION (net/http allows a
		// fragment of twice what is left), the stream is reset; one
		// byte over, it is 431. A count above net/http's would send the
		// CONTINUATION after net/http's cut (GOAWAY), one below would
		// leave the request within it to net/http's 400.
		limit := h2MaxHeaderList(tp.maxHeaderBytes())
		for _, tc := range []struct {
			name string
			size int
			want string
		}{
			{"just within the limit", limit - len(malformedField)/2, "RST_STREAM PROTOCOL_ERROR"},
			{"one byte over the limit", limit + 1, ":status 431"},
		} {
			t.Run(port+"/"+tc.name, func(t *testing.T) {
				c := dialH2At(t, tp, addr)
				kv := h2Fields("GET", addr, "/edge", "connection", "close")
				size := 0
				for i := 0; i < len(kv); i += 2 {
					size += len(kv[i]) + len(kv[i+1]) + 32
				}
				// Fields of 4,000 bytes, then one for what is left.
				for rest := tc.size - size; rest > 0; {
					n := min(rest, 4000+32+len("x-pad"))
					kv = append(kv, "x-pad", strings.Repeat("p", n-32-len("x-pad")))
					rest -= n
				}
				var err error
				func() {
					c.wmu.Lock()
					defer c.wmu.Unlock()
					b := c.block(kv...)
					n := min(len(b), maxFrameSize)
					err = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:n], EndStream: true, EndHeaders: n == len(b)})
					for b = b[n:]; len(b) > 0 && err == nil; b = b[n:] {
						n = min(len(b), maxFrameSize)
						err = c.fr.WriteContinuation(1, n == len(b), b[:n])
					}
				}()
				if err != nil {
					t.Fatal(err)
				}
				if got := c.answer(t, 1).String(); got != tc.want {
					t.Errorf("a header list of %d bytes (limit %d) with a connection field: got %s, want %s", tc.size, limit, got, tc.want)
				}
				if err := c.request(3, h2Fields("GET", addr, "/after")...); err != nil {
					t.Fatal(err)
				}
				if got := c.answer(t, 3).String(); got != ":status 200" {
					t.Errorf("next request on the connection: got %s, want :status 200", got)
				}
			})
		}
	}
}

// TestH2RepeatedSettings is h2spec http2/6.5.3/1: a SETTINGS frame may name
// a setting twice, and they are processed in order (RFC 9113 §6.5.3), so
// the last value holds. net/http alone hangs up on a repeat. An invalid
// value is still a connection error of its kind.
func TestH2RepeatedSettings(t *testing.T) {
	tp := startH2Proxy(t, &recorder{})
	s := func(id http2.SettingID, v uint32) http2.Setting { return http2.Setting{ID: id, Val: v} }
	for port, addr := range tlsPorts(tp) {
		t.Run(port, func(t *testing.T) {
			t.Run("last value holds", func(t *testing.T) {
				c := dialH2At(t, tp, addr, s(http2.SettingInitialWindowSize, 100), s(http2.SettingInitialWindowSize, 1))
				if err := c.request(1, h2Fields("GET", addr, "/")...); err != nil {
					t.Fatal(err)
				}
				if got, want := c.answer(t, 1).String(), ":status 200"; got != want {
					t.Fatalf("got %s, want %s", got, want)
				}
				first := c.wait(t, "DATA", func(ev frameEvent) bool { return ev.Type == http2.FrameData && ev.StreamID == 1 && len(ev.Data) > 0 })
				if len(first.Data) != 1 {
					t.Errorf("first DATA frame carries %d bytes, want 1 (the last SETTINGS_INITIAL_WINDOW_SIZE)", len(first.Data))
				}
			})
			for _, tc := range []struct {
				name     string
				settings []http2.Setting
				want     string
			}{
				{"invalid first", []http2.Setting{s(http2.SettingEnablePush, 2), s(http2.SettingEnablePush, 0)}, "GOAWAY PROTOCOL_ERROR"},
				{"invalid last", []http2.Setting{s(http2.SettingEnablePush, 0), s(http2.SettingEnablePush, 2)}, "GOAWAY PROTOCOL_ERROR"},
				{"window overflow", []http2.Setting{s(http2.SettingInitialWindowSize, 1), s(http2.SettingInitialWindowSize, 1<<31)}, "GOAWAY FLOW_CONTROL_ERROR"},
				{"frame size", []http2.Setting{s(http2.SettingMaxFrameSize, 1<<14), s(http2.SettingMaxFrameSize, 1<<24)}, "GOAWAY PROTOCOL_ERROR"},
			} {
				t.Run(tc.name, func(t *testing.T) {
					c := dialH2At(t, tp, addr, tc.settings...)
					c.request(1, h2Fields("GET", addr, "/")...)
					if got := c.answer(t, 1).String(); got != tc.want {
						t.Errorf("got %s, want %s", got, tc.want)
					}
				})
			}
		})
	}
}

func TestLastSettings(t *testing.T) {
	type kv = [2]uint32
	for _, tc := range []struct {
		in, want []kv
	}{
		{nil, nil},
		{[]kv{{4, 100}}, []kv{{4, 100}}},
		{[]kv{{4, 100}, {3, 10}}, []kv{{4, 100}, {3, 10}}},
		{[]kv{{4, 100}, {4, 1}}, []kv{{4, 1}}},
		{[]kv{{4, 100}, {3, 10}, {4, 1}, {3, 20}, {4, 2}}, []kv{{3, 20}, {4, 2}}},
		// Nothing after the first invalid value counts.
		{[]kv{{4, 100}, {2, 7}, {4, 1}}, []kv{{4, 100}, {2, 7}}},
		{[]kv{{4, 100}, {4, 1}, {5, 1}, {4, 5}}, []kv{{4, 1}, {5, 1}}},
		// No repeat: left as it is, invalid values included.
		{[]kv{{2, 7}, {4, 1}}, []kv{{2, 7}, {4, 1}}},
		// Unknown settings repeat like any other.
		{[]kv{{0xf0, 1}, {0xf0, 2}}, []kv{{0xf0, 2}}},
	} {
		enc := func(s []kv) []byte {
			var b []byte
			for _, e := range s {
				b = binary.BigEndian.AppendUint16(b, uint16(e[0]))
				b = binary.BigEndian.AppendUint32(b, e[1])
			}
			return b
		}
		p := enc(tc.in)
		if got, want := p[:lastSettings(p)], enc(tc.want); !bytes.Equal(got, want) {
			t.Errorf("lastSettings(%v) = %x, want %x", tc.in, got, want)
		}
	}

	// More than 100 settings: net/http hangs up, h2conn leaves them.
	p := make([]byte, 6*101)
	if got, want := lastSettings(p), len(p); got != want {
		t.Errorf("101 settings: length %d, want %d", got, want)
	}
}

// filterBytes sends in through a loopback TCP connection and returns what
// h2conn makes of it, read to the end. Both ends close with RST (linger 0),
// so that a fuzzer's thousands of connections a second leave no TIME_WAIT
// behind to run out of ports.
func filterBytes(t testing.TB, in []byte) []byte {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	client.(*net.TCPConn).SetLinger(0)
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	server.(*net.TCPConn).SetLinger(0)
	go func() {
		client.Write(in)
		client.(*net.TCPConn).CloseWrite()
	}()
	out, err := io.ReadAll(newH2Conn(server, maxFrameSize, 1<<20, 1<<20, 0))
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// refFramer reads frames as net/http's HTTP/2 server does.
func refFramer(b []byte) (*http2.Framer, *bytes.Reader) {
	r := bytes.NewReader(b)
	fr := http2.NewFramer(io.Discard, r)
	fr.SetMaxReadFrameSize(maxFrameSize)
	fr.ReadMetaHeaders = hpack.NewDecoder(hpackTableSize, nil)
	fr.MaxHeaderListSize = 1 << 20
	return fr, r
}

// settingsOutcome is what processing a SETTINGS frame in order leaves (RFC
// 9113 §6.5.3): the last value of each setting, or the error of the first
// invalid one; for HEADER_TABLE_SIZE the smallest value, which the
// server's encoder must signal (RFC 7541 §4.2, lastSettings).
func settingsOutcome(f http2.Frame, err error) string {
	if err != nil {
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			return "error " + http2.ErrCode(ce).String()
		}
		return "error " + err.Error()
	}
	sf := f.(*http2.SettingsFrame)
	last := map[http2.SettingID]uint32{}
	outcome := ""
	sf.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			outcome = "error " + http2.ErrCode(err.(http2.ConnectionError)).String()
			return err
		}
		if v, ok := last[s.ID]; ok && s.ID == http2.SettingHeaderTableSize {
			last[s.ID] = min(v, s.Val)
		} else {
			last[s.ID] = s.Val
		}
		return nil
	})
	if outcome != "" {
		return outcome
	}
	if sf.NumSettings() > 100 {
		return "error PROTOCOL_ERROR"
	}
	return fmt.Sprint(last)
}

// connectionSpecific reports whether fields make a malformed request.
func connectionSpecific(fields []hpack.HeaderField) bool {
	te := 0
	for _, f := range fields {
		switch f.Name {
		case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
			return true
		case "te":
			if te++; te > 1 || f.Value != "trailers" && f.Value != "" {
				return true
			}
		}
	}
	return false
}

// checkH2Filter compares, frame by frame as net/http reads them, what a
// client sent (in) with what h2conn passed on (out): the same frames, but
// each malformed header block now a stream error PROTOCOL_ERROR, and each
// SETTINGS frame without repeats and with the same outcome.
func checkH2Filter(t testing.TB, in, out []byte) {
	t.Helper()
	if !bytes.HasPrefix(out, []byte(http2.ClientPreface)) {
		t.Fatalf("output starts %q, want the client preface", out[:min(len(out), 24)])
	}
	fi, ri := refFramer(in[len(http2.ClientPreface):])
	fo, ro := refFramer(out[len(http2.ClientPreface):])
	for frame := 0; ; frame++ {
		typ := func(b []byte, r *bytes.Reader) (http2.FrameType, http2.Flags) {
			pos := len(b) - r.Len()
			if r.Len() < 9 {
				return 0xff, 0
			}
			return http2.FrameType(b[pos+3]), http2.Flags(b[pos+4])
		}
		ti, flags := typ(in[len(http2.ClientPreface):], ri)
		to, _ := typ(out[len(http2.ClientPreface):], ro)
		a, errA := fi.ReadFrame()
		b, errB := fo.ReadFrame()
		where := fmt.Sprintf("frame %d (%v)", frame, ti)
		if ti == http2.FrameSettings && to == http2.FrameSettings && !flags.Has(http2.FlagSettingsAck) {
			gotOut, wantIn := settingsOutcome(b, errB), settingsOutcome(a, errA)
			if gotOut != wantIn {
				t.Fatalf("%s: SETTINGS outcome %s, want %s", where, gotOut, wantIn)
			}
			if errB != nil {
				return
			}
			if sf := b.(*http2.SettingsFrame); sf.NumSettings() <= 100 && sf.HasDuplicates() && gotOut[:5] != "error" {
				t.Fatalf("%s: SETTINGS still repeats a setting", where)
			}
			continue
		}
		if errA != nil {
			var se http2.StreamError
			if errors.As(errA, &se) {
				var so http2.StreamError
				if !errors.As(errB, &so) || so.StreamID != se.StreamID || so.Code != se.Code {
					t.Fatalf("%s: got %v, want stream error %v", where, errB, errA)
				}
				continue
			}
			if errB == nil || errors.As(errB, new(http2.StreamError)) {
				t.Fatalf("%s: got %v, want an error that ends the connection, like %v", where, errB, errA)
			}
			if errA == io.EOF && errB != io.EOF {
				t.Fatalf("%s: got %v, want the end", where, errB)
			}
			return
		}
		if mh, ok := a.(*http2.MetaHeadersFrame); ok && connectionSpecific(mh.Fields) && !mh.Truncated {
			var so http2.StreamError
			if !errors.As(errB, &so) || so.StreamID != mh.StreamID || so.Code != http2.ErrCodeProtocol {
				t.Fatalf("%s: malformed block %v: got %v %v, want stream error PROTOCOL_ERROR", where, mh.Fields, b, errB)
			}
			continue
		}
		if errB != nil {
			t.Fatalf("%s: got %v, want %v", where, errB, a)
		}
		if got, want := describeFrame(b), describeFrame(a); got != want {
			t.Fatalf("%s: got %s, want %s", where, got, want)
		}
	}
}

// describeFrame is a frame's header and content, comparable across framers.
func describeFrame(f http2.Frame) string {
	h := f.Header()
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return fmt.Sprintf("%v %v %v %v trunc=%v", h.Type, h.StreamID, f.StreamEnded(), f.Fields, f.Truncated)
	case *http2.DataFrame:
		return fmt.Sprintf("%v %q", h, f.Data())
	}
	v := reflect.ValueOf(f).Elem()
	return fmt.Sprintf("%v %+v", h, v.Interface())
}

// h2FilterSeeds are client byte streams after the preface.
func h2FilterSeeds() [][]byte {
	var seeds [][]byte
	add := func(build func(fr *http2.Framer, block func(kv ...string) []byte)) {
		var b, eb bytes.Buffer
		fr := http2.NewFramer(&b, nil)
		enc := hpack.NewEncoder(&eb)
		block := func(kv ...string) []byte {
			eb.Reset()
			for i := 0; i+1 < len(kv); i += 2 {
				enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
			}
			return bytes.Clone(eb.Bytes())
		}
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
		build(fr, block)
		seeds = append(seeds, b.Bytes())
	}
	get := func(kv ...string) []string { return h2Fields("GET", "cells.example.com", "/a", kv...) }
	headers := func(fr *http2.Framer, id uint32, b []byte) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b, EndStream: true, EndHeaders: true})
	}
	add(func(fr *http2.Framer, block func(...string) []byte) {
		headers(fr, 1, block(get("x-trace", "one", "connection", "keep-alive")...))
		headers(fr, 3, block(get("x-trace", "one", "connection", "keep-alive")...))
		headers(fr, 5, block(get("x-trace", "one")...))
	})
	add(func(fr *http2.Framer, block func(...string) []byte) {
		b := block(get("te", "gzip", "x-filler", "0123456789")...)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:5], PadLength: 3, Priority: http2.PriorityParam{Weight: 1}})
		fr.WriteContinuation(1, false, b[5:9])
		fr.WriteContinuation(1, true, b[9:])
		fr.WriteWindowUpdate(0, 1000)
		fr.WritePing(false, [8]byte{1})
	})
	add(func(fr *http2.Framer, block func(...string) []byte) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(h2Fields("POST", "c", "/up")...), EndHeaders: true})
		fr.WriteData(1, false, []byte("part"))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("upgrade", "h2c"), EndHeaders: true, EndStream: true})
		fr.WriteRSTStream(3, http2.ErrCodeCancel)
	})
	add(func(fr *http2.Framer, block func(...string) []byte) {
		headers(fr, 1, block(get("X-Upper", "1", "connection", "close")...))
		headers(fr, 3, block(get("te", "trailers")...))
	})
	for _, s := range [][]http2.Setting{
		{{ID: http2.SettingInitialWindowSize, Val: 100}, {ID: http2.SettingInitialWindowSize, Val: 1}},
		{{ID: http2.SettingEnablePush, Val: 2}, {ID: http2.SettingEnablePush, Val: 0}},
		{{ID: http2.SettingInitialWindowSize, Val: 1}, {ID: http2.SettingInitialWindowSize, Val: 1 << 31}},
	} {
		add(func(fr *http2.Framer, block func(...string) []byte) {
			fr.WriteSettings(s...)
			headers(fr, 1, block(get()...))
		})
	}
	// A frame cut short, and a CONTINUATION out of place.
	add(func(fr *http2.Framer, block func(...string) []byte) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(get()...)})
		fr.WriteData(1, true, nil)
	})
	last := seeds[0]
	seeds = append(seeds, last[:len(last)-3])
	return seeds
}

// FuzzH2Filter: whatever a client sends after the preface, net/http reads
// through h2conn the frames it would have read without it, except that a
// malformed header block resets its stream and a SETTINGS frame loses its
// repeats but not their outcome; HPACK state never drifts.
func FuzzH2Filter(f *testing.F) {
	for _, seed := range h2FilterSeeds() {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, frames []byte) {
		in := append([]byte(http2.ClientPreface), frames...)
		checkH2Filter(t, in, filterBytes(t, in))
	})
}

// TestH2RepeatedHeaderTableSize: a client that sends, in one SETTINGS
// frame, SETTINGS_HEADER_TABLE_SIZE 0 then 4096 (the way to make the peer's
// encoder empty its dynamic table) must see the server's encoder signal the
// smallest of them, 0, at the start of its next header block (RFC 7541
// §4.2: "the smallest maximum size that occurred in that interval MUST be
// signaled in a dynamic table size update"), which processing the settings
// in order (RFC 9113 §6.5.3) gives. A decoder such as nghttp2's refuses a
// block without it (COMPRESSION_ERROR).
func TestH2RepeatedHeaderTableSize(t *testing.T) {
	tp := startH2Proxy(t, &recorder{})
	for port, addr := range tlsPorts(tp) {
		t.Run(port, func(t *testing.T) {
			conn := tp.dialTLSH2(t, addr)
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			fr := h2Start(t, conn)
			// block returns the response header block of stream id,
			// answering SETTINGS and counting SETTINGS ACKs on the way.
			acks := 0
			block := func(id uint32) []byte {
				t.Helper()
				var b []byte
				for {
					f, err := fr.ReadFrame()
					if err != nil {
						t.Fatalf("waiting for stream %d's answer: %v", id, err)
					}
					switch f := f.(type) {
					case *http2.SettingsFrame:
						if f.IsAck() {
							acks++
						} else {
							fr.WriteSettingsAck()
						}
					case *http2.GoAwayFrame:
						t.Fatalf("GOAWAY %v", f.ErrCode)
					case *http2.RSTStreamFrame:
						if f.StreamID == id {
							t.Fatalf("RST_STREAM %v", f.ErrCode)
						}
					case *http2.HeadersFrame:
						if f.StreamID == id {
							b = append(b, f.HeaderBlockFragment()...)
							if f.HeadersEnded() {
								return b
							}
						}
					case *http2.ContinuationFrame:
						if f.StreamID == id {
							b = append(b, f.HeaderBlockFragment()...)
							if f.HeadersEnded() {
								return b
							}
						}
					}
				}
			}
			get := func(id uint32, path string) {
				t.Helper()
				err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndStream: true, EndHeaders: true,
					BlockFragment: hpackBlock(h2Fields("GET", addr, "/"+port+path)...)})
				if err != nil {
					t.Fatal(err)
				}
			}
			// A first answer fills the server encoder's dynamic table.
			get(1, "/first")
			block(1)
			// Then 0 and 4096: the table must be emptied.
			if err := fr.WriteSettings(
				http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0},
				http2.Setting{ID: http2.SettingHeaderTableSize, Val: 4096}); err != nil {
				t.Fatal(err)
			}
			get(3, "/second")
			b := block(3)
			// The block must start with dynamic table size updates
			// (001xxxxx), the first of them at most 0.
			if len(b) == 0 || b[0]&0xe0 != 0x20 {
				t.Fatalf("the answer's header block starts with %#x, not with a dynamic table size update", b[:min(len(b), 4)])
			}
			size := uint64(b[0] & 0x1f)
			if size == 0x1f {
				m := 0
				for i := 1; i < len(b); i++ {
					size += uint64(b[i]&0x7f) << m
					m += 7
					if b[i]&0x80 == 0 {
						break
					}
				}
			}
			if size != 0 {
				t.Errorf("after SETTINGS_HEADER_TABLE_SIZE 0 then 4096, the server's first dynamic table size update is %d, want 0 (RFC 7541 §4.2): the server's encoder kept its table", size)
			}
		})
	}
}
