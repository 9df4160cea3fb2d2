package proxy

import (
	"fmt"
	"io"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// resetPeer is a Cells that ends each server-streaming call as its request
// metadata asks: x-fate "before" resets it with x-code before the response
// header; "mid" resets it after the header and one message; "drop-mid"
// drops the connection there instead; "after-trailers" sends a complete
// answer, then the reset; "goaway" sends GOAWAY with last stream ID 0, the
// call unprocessed, and closes the connection. Three fates break HTTP/2 on
// the call's stream alone: "bad-head" answers with a field name in upper
// case, "open-trailers" sends its trailers after a message without
// END_STREAM, "bad-trailers" puts an upper-case name in them. calls counts
// the calls it saw, each attempt the proxy makes.
func resetPeer(t *testing.T, calls *atomic.Int32) *h2Peer {
	return newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		calls.Add(1)
		var code uint32
		fmt.Sscan(s.Get("x-code"), &code)
		fate := s.Get("x-fate")
		switch fate {
		case "before":
			s.reset(http2.ErrCode(code))
			return
		case "goaway":
			s.c.goAway(0, http2.ErrCodeNo)
			s.c.close()
			return
		case "bad-head":
			if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc", "X-Bad", "1") == nil &&
				s.writeData(streamMsg("first"), false) == nil {
				s.writeHeaders(true, 1, "grpc-status", "0")
			}
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil ||
			s.writeData(streamMsg("first"), false) != nil {
			return
		}
		switch fate {
		case "mid":
			s.reset(http2.ErrCode(code))
		case "drop-mid":
			s.c.abort()
		case "after-trailers":
			if s.writeHeaders(true, 1, "grpc-status", "0") == nil {
				s.reset(http2.ErrCode(code))
			}
		case "open-trailers":
			s.writeHeaders(false, 1, "grpc-status", "0")
		case "bad-trailers":
			s.writeHeaders(true, 1, "grpc-status", "0", "X-Bad", "1")
		}
	})
}

// TestGRPCResetStatus: Cells resets a call with each RST_STREAM error code,
// before its response header and after the header and one message. A
// grpc-go client through the proxy gets the status code grpc-go's client
// derives from the reset when connected to Cells (http2ErrConvTab in
// grpc-go's internal/transport/http_util.go), and a message naming the
// code. UNAVAILABLE, which clients take as safe to retry, only for
// REFUSED_STREAM: a call reset once Cells had started on it (a Cells Sync
// write) must not be sent again.
func TestGRPCResetStatus(t *testing.T) {
	t.Parallel()
	cases := []struct {
		code http2.ErrCode
		want codes.Code
	}{
		{http2.ErrCodeNo, codes.Internal},
		{http2.ErrCodeProtocol, codes.Internal},
		{http2.ErrCodeInternal, codes.Internal},
		{http2.ErrCodeFlowControl, codes.ResourceExhausted},
		{http2.ErrCodeSettingsTimeout, codes.Internal},
		{http2.ErrCodeStreamClosed, codes.Internal},
		{http2.ErrCodeFrameSize, codes.Internal},
		{http2.ErrCodeRefusedStream, codes.Unavailable},
		{http2.ErrCodeCancel, codes.Canceled},
		{http2.ErrCodeCompression, codes.Internal},
		{http2.ErrCodeConnect, codes.Internal},
		{http2.ErrCodeEnhanceYourCalm, codes.ResourceExhausted},
		{http2.ErrCodeInadequateSecurity, codes.PermissionDenied},
		{http2.ErrCodeHTTP11Required, codes.Internal},
		{http2.ErrCode(0x77), codes.Unknown}, // not in grpc-go's table
	}
	var calls atomic.Int32
	tp := startPeerProxy(t, resetPeer(t, &calls))
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	for _, when := range []string{"before", "mid"} {
		for _, c := range cases {
			t.Run(when+"/"+c.code.String(), func(t *testing.T) {
				ctx := metadata.AppendToOutgoingContext(testCtx(t), "x-fate", when, "x-code", fmt.Sprint(uint32(c.code)))
				var want []string
				if when == "mid" {
					want = []string{"first"}
				}
				before := calls.Load()
				_, err := streamingRecv(t, ctx, tc, want...).Recv()
				if got := status.Code(err); got != c.want {
					t.Errorf("status = %v (%v), want %v", got, err, c.want)
				}
				if got, want := status.Convert(err).Message(), "cells-proxy: upstream reset the stream ("+h2CodeName(uint32(c.code))+")"; got != want {
					t.Errorf("message = %q, want %q", got, want)
				}
				// Only a call refused before its answer is sent again.
				if n := calls.Load() - before; n != 1 && (when != "before" || c.code != http2.ErrCodeRefusedStream) {
					t.Errorf("Cells saw the call %d times, want once", n)
				}
			})
		}
	}
}

// TestGRPCResetStatusOthers: the endings of a call from Cells that are not
// a reset of it, seen from a grpc-go client. A GOAWAY that leaves the call
// unprocessed (each time the proxy sends it again) is UNAVAILABLE, safe to
// retry; so is the connection to Cells lost in the middle of the answer,
// as grpc-go's client gives for a transport that closes. A reset after
// Cells' trailers (grpc-go's server resets a stream whose client has not
// ended it) changes nothing: the call succeeded.
func TestGRPCResetStatusOthers(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	tp := startPeerProxy(t, resetPeer(t, &calls))
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	call := func(t *testing.T, fate string, code http2.ErrCode, want ...string) error {
		ctx := metadata.AppendToOutgoingContext(testCtx(t), "x-fate", fate, "x-code", fmt.Sprint(uint32(code)))
		_, err := streamingRecv(t, ctx, tc, want...).Recv()
		return err
	}

	t.Run("goaway-before", func(t *testing.T) {
		if err := call(t, "goaway", 0); status.Code(err) != codes.Unavailable {
			t.Errorf("status = %v (%v), want %v", status.Code(err), err, codes.Unavailable)
		}
	})
	t.Run("connection-lost-mid", func(t *testing.T) {
		if err := call(t, "drop-mid", 0, "first"); status.Code(err) != codes.Unavailable {
			t.Errorf("status = %v (%v), want %v", status.Code(err), err, codes.Unavailable)
		}
	})
	for _, code := range []http2.ErrCode{http2.ErrCodeNo, http2.ErrCodeCancel, http2.ErrCodeInternal} {
		t.Run("reset-after-trailers/"+code.String(), func(t *testing.T) {
			if err := call(t, "after-trailers", code, "first"); err != io.EOF {
				t.Errorf("end of the stream = %v, want io.EOF: Cells completed the call", err)
			}
		})
	}
}

// TestGRPCStreamFaultStatus: Cells breaks HTTP/2 on a call's stream alone,
// with a malformed response head or malformed trailers. The proxy resets
// that stream (TestGRPCUpstreamBadResponseHeaders) and its client gets
// INTERNAL, as grpc-go's client connected to Cells gives for these: Cells
// has answered the call, so it must not end with UNAVAILABLE, which clients
// take as safe to send again. It was UNAVAILABLE until 2026-11-29. The
// call is not sent again.
func TestGRPCStreamFaultStatus(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	tp := startPeerProxy(t, resetPeer(t, &calls))
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	for _, c := range []struct {
		fate string
		msgs []string // what the client gets before the status
		want string   // in the status message
	}{
		{"bad-head", nil, "malformed response header"},
		{"open-trailers", []string{"first"}, "trailers without END_STREAM"},
		{"bad-trailers", []string{"first"}, "malformed response header"},
	} {
		t.Run(c.fate, func(t *testing.T) {
			ctx := metadata.AppendToOutgoingContext(testCtx(t), "x-fate", c.fate)
			before := calls.Load()
			_, err := streamingRecv(t, ctx, tc, c.msgs...).Recv()
			if got := status.Code(err); got != codes.Internal {
				t.Errorf("status = %v (%v), want %v", got, err, codes.Internal)
			}
			if msg := status.Convert(err).Message(); !strings.Contains(msg, "HTTP/2 error from upstream on the call (PROTOCOL_ERROR): "+c.want) {
				t.Errorf("message = %q, want it to name the fault (%q)", msg, c.want)
			}
			if n := calls.Load() - before; n != 1 {
				t.Errorf("Cells saw the call %d times, want once", n)
			}
		})
	}
}

// deadlinePeer is a Cells that, as grpc-go's server does, resets a call
// with CANCEL once its copy of the call's grpc-timeout has passed, counted
// from when the call's HEADERS arrived: by then the proxy's deadline,
// counted from before it sent them, has passed too. With x-fate "mid" it
// first sends the response header and a message.
func deadlinePeer(t *testing.T) *h2Peer {
	return newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		arrived := time.Now()
		d, ok := parseGRPCTimeout(s.Get("grpc-timeout"))
		if !ok {
			s.reset(http2.ErrCodeInternal)
			return
		}
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.Get("x-fate") == "mid" {
			if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil ||
				s.writeData(grpcMsg([]byte("first")), false) != nil {
				return
			}
		}
		select {
		case <-time.After(time.Until(arrived.Add(d))):
		case <-s.Done():
			return
		}
		s.reset(http2.ErrCodeCancel)
	})
}

// TestGRPCResetAfterDeadline: Cells resets a call with CANCEL when its copy
// of the deadline passes, before its response header or in the middle of
// the answer. The client gets DEADLINE_EXCEEDED, as grpc-go's client
// connected to Cells would, not the CANCELLED that CANCEL maps to
// otherwise (TestGRPCResetStatus): whether the proxy's own timer or Cells'
// reset ends the call first. The client is net/http's and sets no deadline
// of its own, so that the status it reads is the proxy's (a grpc-go client
// would give DEADLINE_EXCEEDED by itself, its deadline being the first to
// pass). TestGRPCResetPastDeadlineBeforeTimer makes sure of the case where
// the reset comes first.
func TestGRPCResetAfterDeadline(t *testing.T) {
	t.Parallel()
	tp := startPeerProxy(t, deadlinePeer(t))
	for _, fate := range []string{"before", "mid"} {
		t.Run(fate, func(t *testing.T) {
			t.Parallel()
			r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Stream", grpcMsg(nil), "grpc-timeout", "100m", "x-fate", fate)
			if r.Err != nil {
				t.Fatal(r.Err)
			}
			status, msg := r.Trailer.Get("Grpc-Status"), r.Trailer.Get("Grpc-Message")
			if status == "" { // Trailers-Only
				status, msg = r.Header.Get("Grpc-Status"), r.Header.Get("Grpc-Message")
			}
			if status != "4" {
				t.Errorf("grpc-status = %q (%q), want \"4\" (DEADLINE_EXCEEDED)", status, msg)
			}
		})
	}
}

// TestGRPCResetPastDeadlineBeforeTimer: Cells' reset (CANCEL, its copy of
// the deadline passed) arrives once the call's deadline has passed but
// before the proxy's timer for it has fired (lateCtx: a loaded machine
// runs timers late), before the response header and after it. The call
// still ends DEADLINE_EXCEEDED: pastDeadline, not the timer, decides.
func TestGRPCResetPastDeadlineBeforeTimer(t *testing.T) {
	t.Parallel()
	tp := startPeerProxy(t, deadlinePeer(t))
	for _, fate := range []string{"before", "mid"} {
		t.Run(fate, func(t *testing.T) {
			t.Parallel()
			// The peer's copy of the deadline is 50 ms from the HEADERS'
			// arrival, after the call's.
			ctx := lateCtx{t.Context(), time.Now().Add(50 * time.Millisecond)}
			req, err := grpcRequest(ctx, "http://cells/pkg.Svc/Stream", grpcMsg(nil))
			if err != nil {
				t.Fatal(err)
			}
			// As the proxy's HTTP/2 server hands a gRPC call over.
			req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/2.0", 2, 0
			req.ContentLength = -1
			req.Header.Set("Grpc-Timeout", "50m")
			req.Header.Set("X-Fate", fate)
			res, err := tp.fwd.startGRPC(req)
			var code int
			var msg string
			if fate == "before" {
				if err == nil {
					res.Body.Close()
					t.Fatal("Cells' answer came through; want the call reset before its header")
				}
				w := httptest.NewRecorder()
				tp.fwd.errorHandler(w, req, err)
				code, _ = strconv.Atoi(w.Header().Get("Grpc-Status"))
				msg = w.Header().Get("Grpc-Message")
			} else {
				if err != nil {
					t.Fatal(err)
				}
				_, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err == nil {
					t.Fatal("Cells' answer came complete; want it reset")
				}
				var ok bool
				if code, msg, ok = grpcBroken(ctx, err); !ok {
					t.Fatalf("grpcBroken(%v): the client taken for gone", err)
				}
			}
			if code != 4 {
				t.Errorf("grpc-status = %d (%q), want 4 (DEADLINE_EXCEEDED)", code, msg)
			}
		})
	}
}
