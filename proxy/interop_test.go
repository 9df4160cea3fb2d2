package proxy

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/grpclog"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// The interop helpers report a failure with grpclog's Fatal, which calls
// os.Exit. This logger turns Fatal into a panic that runInterop recovers
// into a test failure, and discards the rest of grpc-go's logging (it
// reports every connection the proxy tests break on purpose).
// SetLoggerV2 must run before any gRPC function: hence init.
func init() { grpclog.SetLoggerV2(fatalPanics{}) }

// interopFailure is what an interop helper's Fatal panics with.
type interopFailure string

type fatalPanics struct{}

func (fatalPanics) Info(...any)                  {}
func (fatalPanics) Infoln(...any)                {}
func (fatalPanics) Infof(string, ...any)         {}
func (fatalPanics) Warning(...any)               {}
func (fatalPanics) Warningln(...any)             {}
func (fatalPanics) Warningf(string, ...any)      {}
func (fatalPanics) Error(...any)                 {}
func (fatalPanics) Errorln(...any)               {}
func (fatalPanics) Errorf(string, ...any)        {}
func (fatalPanics) Fatal(args ...any)            { panic(interopFailure(fmt.Sprint(args...))) }
func (fatalPanics) Fatalln(args ...any)          { panic(interopFailure(fmt.Sprintln(args...))) }
func (fatalPanics) Fatalf(f string, args ...any) { panic(interopFailure(fmt.Sprintf(f, args...))) }
func (fatalPanics) V(int) bool                   { return false }

// runInterop runs an interop helper and turns its Fatal into t.Error.
func runInterop(t *testing.T, f func()) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			msg, ok := r.(interopFailure)
			if !ok {
				panic(r)
			}
			t.Errorf("interop: %s", msg)
		}
	}()
	f()
}

// interopCase is one of the grpc-go interop client's test cases
// (interop/client/client.go, -test_case).
type interopCase struct {
	name string
	// opts are extra dial options, as the interop client's flags give.
	opts []grpc.DialOption
	run  func(ctx context.Context, t *testing.T, tc testgrpc.TestServiceClient, cc *grpc.ClientConn, newCC func() *grpc.ClientConn)
}

// interopCases are every case of the interop client that needs nothing but
// the interop server. Left out, because they test something other than the
// path between client and server: compute_engine_creds,
// service_account_creds, jwt_token_creds, per_rpc_creds, oauth2_auth_token,
// google_default_credentials and compute_engine_channel_credentials (they
// need Google credentials); pick_first_unary (it needs the server id that
// only the xDS interop server fills in); orca_oob (the interop server
// shortens the ORCA reporting interval below 30 s through a hook in
// grpc-go's internal package, which a test outside grpc-go cannot import;
// with 30 s reports the case takes minutes per run).
var interopCases = []interopCase{
	{name: "empty_unary", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoEmptyUnaryCall(ctx, tc)
	}},
	{name: "large_unary", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoLargeUnaryCall(ctx, tc)
	}},
	{name: "client_streaming", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoClientStreaming(ctx, tc)
	}},
	{name: "server_streaming", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoServerStreaming(ctx, tc)
	}},
	{name: "ping_pong", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoPingPong(ctx, tc)
	}},
	{name: "empty_stream", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoEmptyStream(ctx, tc)
	}},
	{name: "timeout_on_sleeping_server", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoTimeoutOnSleepingServer(ctx, tc)
	}},
	{name: "cancel_after_begin", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoCancelAfterBegin(ctx, tc)
	}},
	{name: "cancel_after_first_response", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoCancelAfterFirstResponse(ctx, tc)
	}},
	{name: "status_code_and_message", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoStatusCodeAndMessage(ctx, tc)
	}},
	{name: "special_status_message", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoSpecialStatusMessage(ctx, tc)
	}},
	{name: "custom_metadata", run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoCustomMetadata(ctx, tc)
	}},
	{name: "unimplemented_method", run: func(ctx context.Context, _ *testing.T, _ testgrpc.TestServiceClient, cc *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoUnimplementedMethod(ctx, cc)
	}},
	{name: "unimplemented_service", run: func(ctx context.Context, _ *testing.T, _ testgrpc.TestServiceClient, cc *grpc.ClientConn, _ func() *grpc.ClientConn) {
		interop.DoUnimplementedService(ctx, testgrpc.NewUnimplementedServiceClient(cc))
	}},
	{name: "rpc_soak", run: func(ctx context.Context, _ *testing.T, _ testgrpc.TestServiceClient, cc *grpc.ClientConn, _ func() *grpc.ClientConn) {
		cfg := soakConfig()
		cfg.ChannelForTest = func() (*grpc.ClientConn, func()) { return cc, func() {} }
		interop.DoSoakTest(ctx, cfg)
	}},
	{name: "channel_soak", run: func(ctx context.Context, _ *testing.T, _ testgrpc.TestServiceClient, _ *grpc.ClientConn, newCC func() *grpc.ClientConn) {
		cfg := soakConfig()
		cfg.ChannelForTest = func() (*grpc.ClientConn, func()) {
			cc := newCC()
			return cc, func() { cc.Close() }
		}
		interop.DoSoakTest(ctx, cfg)
	}},
	{
		name: "orca_per_rpc",
		// As the interop client's -service_config_json for this case:
		// the interop package's ORCA test balancer reads the per-call
		// load report from the endpoint-load-metrics-bin trailer.
		opts: []grpc.DialOption{grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"test_backend_metrics_load_balancer": {}}]}`)},
		run: func(ctx context.Context, _ *testing.T, tc testgrpc.TestServiceClient, _ *grpc.ClientConn, _ func() *grpc.ClientConn) {
			interop.DoORCAPerRPCTest(ctx, tc)
		},
	},
}

// soakConfig is the interop client's soak configuration, made smaller: 10
// large unary calls (271828 bytes up, 314159 down) with no failure allowed.
// The latency limit is no assertion here; it only has to be far above what
// a loaded machine needs.
func soakConfig() interop.SoakTestConfig {
	return interop.SoakTestConfig{
		RequestSize:                      271828,
		ResponseSize:                     314159,
		PerIterationMaxAcceptableLatency: 30 * time.Second,
		OverallTimeout:                   2 * time.Minute,
		NumWorkers:                       1,
		Iterations:                       10,
		MaxFailures:                      0,
	}
}

// TestGRPCInterop runs the grpc-go interop client's cases through the proxy
// against the interop server, in both topologies and on both ports.
func TestGRPCInterop(t *testing.T) {
	t.Parallel()
	for _, topo := range grpcTopologies {
		t.Run(string(topo), func(t *testing.T) {
			e := startGRPC(t, topo, nil)
			for _, port := range grpcPorts {
				t.Run(string(port), func(t *testing.T) {
					for _, c := range interopCases {
						t.Run(c.name, func(t *testing.T) {
							cc := e.dial(t, port, c.opts...)
							newCC := func() *grpc.ClientConn { return newGRPCClient(t, e.tp, e.addr(port), c.opts...) }
							ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
							defer cancel()
							runInterop(t, func() {
								c.run(ctx, t, testgrpc.NewTestServiceClient(cc), cc, newCC)
							})
						})
					}
				})
			}
		})
	}
}
