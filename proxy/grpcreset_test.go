package proxy

import (
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"

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
