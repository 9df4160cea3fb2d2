package proxy

import (
	"context"
	"io"
	"net/http"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// Benchmarks of the hot path: a small GET through the proxy to a TLS
// upstream, in process. Client, proxy and upstream share the CPUs, so read
// the figures as relative (benchstat before/after), not as capacity; the
// harness under bench/ measures against nginx and HAProxy.
//
//	go test ./proxy -run '^$' -bench Proxy -benchmem -count 6 | tee new.txt
func BenchmarkProxySmallGET(b *testing.B) {
	body := []byte("hello from cells\n")
	up := newUpstream(b, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", "17")
		w.Write(body)
	}))
	tp := startProxy(b, testConfig(up))
	for _, proto := range []struct {
		name string
		c    *http.Client
	}{{"h1", tp.H1}, {"h2", tp.H2}} {
		b.Run(proto.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					res, err := proto.c.Get(tp.URL + "/small")
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, res.Body)
					res.Body.Close()
				}
			})
		})
	}
}

// BenchmarkProxyGRPCUnary: a unary call (a 64-byte message each way)
// through the proxy's main port to a TLS upstream that serves gRPC as
// Cells does, grpc-go on both ends. Most of the allocations are grpc-go's;
// the difference between two runs is the proxy's.
func BenchmarkProxyGRPCUnary(b *testing.B) {
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, interop.NewTestServer(interop.NewTestServerOptions{}))
	b.Cleanup(gs.Stop)
	up := newUpstream(b, upTLS, gs)
	tp := startProxy(b, testConfig(up))
	tc := testgrpc.NewTestServiceClient(dialProxy(b, tp, tp.Addr().String()))
	req := &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: make([]byte, 64)}, ResponseSize: 64}
	b.ReportAllocs()
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := tc.UnaryCall(context.Background(), req); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
