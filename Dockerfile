# cells-proxy: a static binary on a distroless base.
#
#   docker build -t cells-proxy .
#   docker build --build-arg VERSION=$(git describe --tags --always) -t cells-proxy .
#
# The builder's Go version is the one go.mod names (go 1.26.8): keep them in step.
# The image carries one file of ours, /cells-proxy, owned by root and run as
# uid 65532 ("nonroot" in distroless' /etc/passwd); it needs nothing else from
# the root filesystem, so it runs with `--read-only --cap-drop ALL`.

FROM golang:1.26.8-bookworm AS build
WORKDIR /src
# Modules first, in their own layer: a source edit does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# CGO_ENABLED=0: a static binary, for a base image with no libc.
# -trimpath: no build-machine paths in the binary (reproducible, nothing leaked).
# -s -w: no symbol table or DWARF; about a third smaller.
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w -X main.version=${VERSION}" -o /out/cells-proxy .

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/cells-proxy /cells-proxy
USER 65532:65532
# 8443: HTTPS, h1 and h2 (gRPC too) on one port (PROXY_HTTPS_ADDR).
# 8080: plain HTTP, answers 301 to https (PROXY_HTTP_ADDR).
# 33060: the dedicated gRPC port, only when PYDIO_GRPC_EXTERNAL=33060 is set.
# The ports are above 1024 because the process has no CAP_NET_BIND_SERVICE: map
# 443 and 80 onto them with `-p 443:8443 -p 80:8080`.
EXPOSE 8443 8080 33060
# Distroless has no shell and no curl: the binary probes its own loopback
# health listener (PROXY_HEALTH_ADDR, default 127.0.0.1:8099, GET /readyz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/cells-proxy", "healthcheck"]
ENTRYPOINT ["/cells-proxy"]
