package proxy

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// grpcCoreClient is a gRPC client in Python on gRPC's C core (Debian's
// python3-grpcio), the other implementation beside grpc-go: its own
// HTTP/2 (BDP pings, windows, header order), TLS (BoringSSL) and status
// handling. It runs the interop cases that need nothing but the interop
// server against argv[1] (host:port), trusting the PEM in argv[2], and
// prints "start name" as each case starts and "name ok" or "name bad: why"
// as it ends. Every call has a 30 s deadline. The messages of
// grpc.testing are written and read by hand (the protobuf wire format),
// so that no generated code is needed.
const grpcCoreClient = `
import queue, sys, threading
import grpc

target, ca = sys.argv[1], open(sys.argv[2], "rb").read()
ch = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))
raw = lambda b: b
svc = "/grpc.testing.TestService/"
unary = lambda m: ch.unary_unary(svc + m, request_serializer=raw, response_deserializer=raw)
stream_out = lambda m: ch.unary_stream(svc + m, request_serializer=raw, response_deserializer=raw)
stream_in = lambda m: ch.stream_unary(svc + m, request_serializer=raw, response_deserializer=raw)
duplex = lambda m: ch.stream_stream(svc + m, request_serializer=raw, response_deserializer=raw)

def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def field(num, value):  # an int as a varint, bytes length-delimited
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    return varint(num << 3 | 2) + varint(len(value)) + value

def fields(msg):  # {number: [values]}: ints for varints, bytes otherwise
    out, i = {}, 0
    while i < len(msg):
        key, i = read_varint(msg, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = read_varint(msg, i)
        elif wire == 2:
            n, i = read_varint(msg, i)
            v, i = msg[i:i + n], i + n
        else:
            raise ValueError("wire type %d" % wire)
        out.setdefault(num, []).append(v)
    return out

def read_varint(b, i):
    n = shift = 0
    while True:
        c = b[i]; i += 1
        n |= (c & 0x7F) << shift; shift += 7
        if not c & 0x80:
            return n, i

def payload(n):  # Payload{body: n bytes}
    return field(2, bytes(i % 251 for i in range(n)))

def body_len(resp):  # the length of a response's payload body
    p = fields(resp).get(1, [b""])[0]
    return len(fields(p).get(2, [b""])[0])

def case(name, f):
    print("start " + name, flush=True)  # so that a hang shows where
    try:
        why = f()
    except grpc.RpcError as e:
        why = "%s %r" % (e.code(), e.details())
    except Exception as e:
        why = repr(e)
    print(name + (" bad: " + why if why else " ok"), flush=True)

def empty_unary():
    got = unary("EmptyCall")(b"", timeout=30)
    return "" if got == b"" else "answer %r" % got

def large_unary():
    req = field(2, 314159) + field(3, payload(271828))
    n = body_len(unary("UnaryCall")(req, timeout=30))
    return "" if n == 314159 else "payload of %d bytes" % n

def client_streaming():
    sizes = [27182, 8, 1828, 45904]
    got = stream_in("StreamingInputCall")(iter([field(1, payload(n)) for n in sizes]), timeout=30)
    total = fields(got).get(1, [0])[0]
    return "" if total == sum(sizes) else "aggregated %d" % total

def server_streaming():
    sizes = [31415, 9, 2653, 58979]
    req = b"".join(field(2, field(1, n)) for n in sizes)
    got = [body_len(r) for r in stream_out("StreamingOutputCall")(req, timeout=30)]
    return "" if got == sizes else "sizes %r" % got

def ping_pong():
    sizes = [(31415, 27182), (9, 8), (2653, 1828), (58979, 45904)]
    q = queue.Queue()
    def requests():
        while True:
            r = q.get()
            if r is None:
                return
            yield r
    call = duplex("FullDuplexCall")(requests(), timeout=30)
    try:
        for out, inp in sizes:
            q.put(field(2, field(1, out)) + field(3, payload(inp)))
            n = body_len(next(call))
            if n != out:
                return "answer of %d bytes, want %d" % (n, out)
    finally:
        q.put(None)  # half-close, whatever happened
    rest = list(call)
    return "" if not rest else "%d answers too many" % len(rest)

def empty_stream():
    got = list(duplex("FullDuplexCall")(iter([]), timeout=30))
    return "" if not got else "%d answers" % len(got)

def echo_status(msg):  # the server fails the call with UNKNOWN and msg
    try:
        unary("UnaryCall")(field(7, field(1, 2) + field(2, msg.encode())), timeout=30)
        return "no error"
    except grpc.RpcError as e:
        return "" if e.code() == grpc.StatusCode.UNKNOWN and e.details() == msg else "%s %r" % (e.code(), e.details())

def status_code_and_message():
    return echo_status("test status message")

def special_status_message():
    return echo_status("\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n")

def custom_metadata():
    md = (("x-grpc-test-echo-initial", "test_initial_metadata_value"),
          ("x-grpc-test-echo-trailing-bin", b"\x0a\x0b\x0a\x0b\x0a\x0b"))
    _, call = unary("UnaryCall").with_call(field(2, 314159) + field(3, payload(271828)), metadata=md, timeout=30)
    initial, trailing = dict(call.initial_metadata()), dict(call.trailing_metadata())
    if initial.get("x-grpc-test-echo-initial") != md[0][1]:
        return "initial metadata %r" % (initial,)
    if trailing.get("x-grpc-test-echo-trailing-bin") != md[1][1]:
        return "trailing metadata %r" % (trailing,)
    return ""

def unimplemented_method():
    try:
        unary("UnimplementedCall")(b"", timeout=30)
        return "no error"
    except grpc.RpcError as e:
        return "" if e.code() == grpc.StatusCode.UNIMPLEMENTED else "%s %r" % (e.code(), e.details())

def timeout_on_sleeping_server():
    q = queue.Queue()
    def requests():
        yield field(3, payload(27182))
        q.get()  # then nothing: the server sleeps on the stream
    try:
        list(duplex("FullDuplexCall")(requests(), timeout=0.001))
        return "no error"
    except grpc.RpcError as e:
        return "" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "%s %r" % (e.code(), e.details())
    finally:
        q.put(None)

def cancel_after_first_response():
    q = queue.Queue()
    def requests():
        yield field(2, field(1, 31415)) + field(3, payload(27182))
        q.get()
    call = duplex("FullDuplexCall")(requests(), timeout=30)
    try:
        n = body_len(next(call))
    finally:
        call.cancel()
        q.put(None)
    try:
        list(call)
        return "no error after cancel"
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            return "%s %r" % (e.code(), e.details())
    return "" if n == 31415 else "first answer of %d bytes" % n

for name, f in list(globals().items()):
    if name in ("empty_unary", "large_unary", "client_streaming", "server_streaming", "ping_pong", "empty_stream",
                "status_code_and_message", "special_status_message", "custom_metadata", "unimplemented_method",
                "timeout_on_sleeping_server", "cancel_after_first_response"):
        case(name, f)
ch.close()
`

// grpcCoreCases are the names grpcCoreClient prints, each "ok" when the
// case passed.
var grpcCoreCases = []string{"empty_unary", "large_unary", "client_streaming", "server_streaming", "ping_pong",
	"empty_stream", "status_code_and_message", "special_status_message", "custom_metadata", "unimplemented_method",
	"timeout_on_sleeping_server", "cancel_after_first_response"}

// pythonGRPC is a python3 that can import grpc, or "".
func pythonGRPC() string {
	candidates := []string{"/usr/bin/python3"} // Debian's, where python3-grpcio goes
	if p, err := exec.LookPath("python3"); err == nil {
		candidates = append(candidates, p)
	}
	for _, p := range candidates {
		if exec.Command(p, "-c", "import grpc").Run() == nil {
			return p
		}
	}
	return ""
}

// TestGRPCCoreClient runs the interop cases of a gRPC client on gRPC's C
// core (Python's grpcio) through the proxy, in both of Cells' topologies,
// on the main port and on the dedicated gRPC port, verifying the proxy's
// certificate. Cells Sync is grpc-go, which the other gRPC tests use; this
// one shows the gRPC path does not lean on grpc-go's ways on the client
// side. Skips where no python3 imports grpc; .ci/run installs
// python3-grpcio.
func TestGRPCCoreClient(t *testing.T) {
	python := pythonGRPC()
	if python == "" {
		t.Skip("no python3 with grpc (apt-get install python3-grpcio; .ci/run installs it)")
	}
	dir := t.TempDir()
	script := filepath.Join(dir, "client.py")
	if err := os.WriteFile(script, []byte(grpcCoreClient), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, topo := range grpcTopologies {
		t.Run(string(topo), func(t *testing.T) {
			e := startGRPC(t, topo, nil)
			ca := proxyCA(t, e.tp)
			for _, port := range grpcPorts {
				t.Run(string(port), func(t *testing.T) {
					out, err := runClient(t, dir, clientEnv(dir), python, script, e.addr(port), ca)
					if err != nil {
						t.Fatalf("the C-core client: %v\n%s", err, out)
					}
					lines := strings.Split(strings.TrimSpace(out), "\n")
					for _, c := range grpcCoreCases {
						if !slices.Contains(lines, c+" ok") {
							t.Errorf("%s: not ok; the client printed:\n%s", c, out)
						}
					}
				})
			}
		})
	}
}
