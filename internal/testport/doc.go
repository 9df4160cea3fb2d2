// Package testport reserves loopback ports for the tests of cells-proxy. A
// port found free by listening on port 0 and closing the listener is free
// only for that moment: the kernel may give it to the next bind to port 0
// of any process. CI once got the same port for PROXY_HTTPS_ADDR and
// PYDIO_GRPC_EXTERNAL, and while one package's tests run beside another's
// (go test ./...), any of their listeners may get it.
package testport
