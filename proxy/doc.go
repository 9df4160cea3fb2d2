// Package proxy is cells-proxy: the TLS front for a Pydio Cells server.
//
// The path of a connection: the public listener (PROXY_HTTPS_ADDR) accepts
// TCP, terminates TLS (TLS 1.2+, ALPN h2 and http/1.1), and hands the
// decrypted stream to cmux, which sends a connection that opens with the
// HTTP/2 preface to net/http's HTTP/2 server, behind h2conn's filter of what
// the client sends (h2conn.go) and writeBehind's batching of what the server
// writes (h2write.go), and every other one to the HTTP/1.1 front
// (h1front.go), which serves the direct path's requests itself and hands a
// connection to net/http's HTTP/1 server at its first other request. All of them share one handler, the forwarder: a request whose
// content type is application/grpc goes to the gRPC upstream (Cells itself
// over TLS, or its cleartext gRPC port) through the proxy's own HTTP/2
// client (grpcupstream.go, callGRPC), a websocket upgrade becomes a
// frame-aware tunnel, and everything else goes to CELLS_UPSTREAM, with the
// Host, the request target and the body passed on unchanged and the
// forwarding headers replaced: on the direct path (direct.go) when it has
// no body or a small one of known length (its answer relayed in batches of
// what Cells has sent, download.go), through an httputil.ReverseProxy
// when it has a body to stream (in batches of what the client has sent,
// upload.go). The dedicated gRPC listener
// (PYDIO_GRPC_EXTERNAL) is TLS and HTTP/2 only and sends everything to the
// gRPC upstream. A plain listener redirects to https, and a health
// listener, on loopback by default, answers health checks.
package proxy
