package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"hash/crc32"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
	"golang.org/x/net/webdav"
)

// This file runs the proxy under clients that Cells' users run, as
// programs: litmus (the WebDAV test suite), rclone and s3cmd. They are not
// Go's clients: their own request writers, encodings of names, multipart
// uploads and signatures go through the proxy. Each test skips where its
// program is missing; .ci/run installs them all.

// clientEnv is the environment of a client program: nothing of the
// caller's but PATH, so that a CA bundle or a configuration file of the
// machine's (AWS_CA_BUNDLE, ~/.s3cfg, rclone.conf) does not decide the
// test. home is the program's HOME and working directory.
func clientEnv(home string, extra ...string) []string {
	return append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + home, "LANG=C.UTF-8"}, extra...)
}

// runClient runs a client program with a deadline, in dir, and returns
// what it printed.
func runClient(t *testing.T, dir string, env []string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir, cmd.Env = dir, env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// needProgram is the path of the first of names found in PATH; without
// any, the test is skipped, naming pkg, the Debian package that has it.
func needProgram(t *testing.T, pkg string, names ...string) string {
	t.Helper()
	for _, name := range names {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skipf("%s is not installed (apt-get install %s; .ci/run installs it)", names[0], pkg)
	return ""
}

// proxyCA writes the certificate the proxy serves to a PEM file, for the
// client programs to verify it with.
func proxyCA(t *testing.T, tp *testProxy) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "proxy-ca.pem")
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tp.cert.Load().Leaf.Raw})
	if err := os.WriteFile(f, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestLitmusWebDAV runs litmus, the WebDAV server test suite, against a
// WebDAV server straight, then through the proxy, and wants every one of
// its tests to end the same way both times. Cells' /dav is a fork of
// golang.org/x/net/webdav, which serves here. What a proxy can break
// there: the Host that COPY and MOVE compare with their Destination (a
// 502 from the server), the Depth, Overwrite, If and Lock-Token fields,
// PROPFIND and PROPPATCH bodies, 207 Multi-Status answers, names with
// UTF-8 in them, and Expect: 100-continue. litmus runs over HTTP/1.1 only,
// as davfs2 and the WebDAV clients of Windows and macOS do. It checks no
// certificate, and skips its expect100 test over TLS: the cleartext case
// runs it through the proxy.
func TestLitmusWebDAV(t *testing.T) {
	litmus := needProgram(t, "litmus", "litmus")
	for _, tc := range []struct {
		name      string
		kind      upstreamKind
		publicTLS bool
	}{
		{"Cells TLS, public TLS", upTLS, true},
		{"Cells cleartext, PROXY_TLS=off", upPlain, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dav := &webdav.Handler{Prefix: "/dav", FileSystem: webdav.NewMemFS(), LockSystem: webdav.NewMemLS()}
			up := newUpstream(t, tc.kind, dav)
			cfg := testConfig(up)
			cfg.TLS = tc.publicTLS
			tp := startProxy(t, cfg)

			straight := runLitmus(t, litmus, up.URL.Scheme+"://"+up.Addr()+"/dav/")
			proxied := runLitmus(t, litmus, tp.URL+"/dav/")
			// Sanity: the suites ran, and most of their tests pass
			// straight (x/net/webdav fails 3 of about 100 and has no
			// shared locks), so that the comparison below is not of
			// two runs that could not connect.
			for _, suite := range []string{"basic", "copymove", "props", "locks", "http"} {
				if !strings.Contains(straight, "<- summary for `"+suite+"'") {
					t.Fatalf("litmus straight to the WebDAV server did not run its %s suite:\n%s", suite, straight)
				}
			}
			if n := strings.Count(straight, " pass"); n < 80 {
				t.Fatalf("litmus straight to the WebDAV server: %d tests passed, want at least 80:\n%s", n, straight)
			}
			if !tc.publicTLS && !strings.Contains(proxied, "expect100............. pass") {
				t.Errorf("litmus through the proxy: expect100 did not pass:\n%s", proxied)
			}
			if proxied != straight {
				a, b := strings.Split(straight, "\n"), strings.Split(proxied, "\n")
				var diff []string
				for _, l := range a {
					if !slices.Contains(b, l) {
						diff = append(diff, "- "+l)
					}
				}
				for _, l := range b {
					if !slices.Contains(a, l) {
						diff = append(diff, "+ "+l)
					}
				}
				t.Errorf("litmus through the proxy differs from litmus straight to the WebDAV server (- straight, + proxied):\n%s\n\nthrough the proxy:\n%s",
					strings.Join(diff, "\n"), proxied)
			}
		})
	}
}

// runLitmus runs litmus's five suites against base, going on after a
// suite's failure, and returns its report with the server's address
// taken out. litmus exits non-zero when any test fails, as some do against
// any server: the report is what is compared.
func runLitmus(t *testing.T, litmus, base string) string {
	t.Helper()
	dir := t.TempDir() // litmus writes debug.log and child.log there
	out, err := runClient(t, dir, clientEnv(dir), litmus, "-k", base)
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatalf("litmus %s: %v\n%s", base, err, out)
	}
	u, _ := url.Parse(base)
	return strings.ReplaceAll(out, u.Host, "HOST")
}

// s3Cells stands in for Cells' S3 gateway: gofakes3, an S3 server in
// memory (rclone's own "serve s3"), behind a check of every request's
// SigV4 signature (verifySigV4). A signature that does not verify is
// answered 403 SignatureDoesNotMatch, as Cells does, and counted.
type s3Cells struct {
	backend *s3mem.Backend
	mu      sync.Mutex
	checked int
	bad     []string
	methods map[string]int
	expect  int // requests that came with Expect: 100-continue
	chunked int // requests whose body was aws-chunked
}

// startS3Cells starts an s3Cells as a TLS Cells (the recommended
// topology) and a proxy in front of it.
func startS3Cells(t *testing.T) (*s3Cells, *testProxy) {
	t.Helper()
	cells, h := newS3Cells()
	return cells, startProxy(t, testConfig(newUpstream(t, upTLS, h)))
}

func newS3Cells() (*s3Cells, http.Handler) {
	c := &s3Cells{backend: s3mem.New(), methods: map[string]int{}}
	s3 := gofakes3.New(c.backend, gofakes3.WithAutoBucket(true), gofakes3.WithLogger(gofakes3.DiscardLog())).Server()
	return c, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		err = verifySigV4(r, body)
		c.mu.Lock()
		c.checked++
		c.methods[r.Method]++
		if strings.EqualFold(r.Header.Get("Expect"), "100-continue") {
			c.expect++
		}
		if err != nil {
			c.bad = append(c.bad, fmt.Sprintf("%s %s: %v", r.Method, r.RequestURI, err))
		}
		c.mu.Unlock()
		if err != nil {
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprintf(w, "<Error><Code>SignatureDoesNotMatch</Code><Message>%s</Message></Error>", err)
			return
		}
		if slices.Contains(strings.Split(r.Header.Get("Content-Encoding"), ","), "aws-chunked") {
			if body, err = decodeAWSChunked(r, body); err != nil {
				c.mu.Lock()
				c.bad = append(c.bad, fmt.Sprintf("%s %s: aws-chunked body: %v", r.Method, r.RequestURI, err))
				c.mu.Unlock()
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			c.mu.Lock()
			c.chunked++
			c.mu.Unlock()
			r.Header.Del("Content-Encoding")
			r.Header.Set("Content-Length", strconv.Itoa(len(body)))
			r.ContentLength = int64(len(body))
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		s3.ServeHTTP(w, r)
	})
}

// decodeAWSChunked is the object an aws-chunked body carries, as S3 decodes
// it: chunks of "<hex size>\r\n<data>\r\n", then "0\r\n", the trailer
// fields and "\r\n". It checks the length against
// X-Amz-Decoded-Content-Length and the data against the checksum the
// trailer that X-Amz-Trailer names carries: a byte changed, lost or added
// on the way fails, as it fails at Cells.
func decodeAWSChunked(r *http.Request, body []byte) ([]byte, error) {
	var data []byte
	rest := body
	line := func() (string, error) {
		l, after, ok := bytes.Cut(rest, []byte("\r\n"))
		if !ok {
			return "", fmt.Errorf("no CRLF after %q", rest[:min(len(rest), 40)])
		}
		rest = after
		return string(l), nil
	}
	for {
		l, err := line()
		if err != nil {
			return nil, err
		}
		size, _, _ := strings.Cut(l, ";") // signed variants add ;chunk-signature=
		n, err := strconv.ParseUint(size, 16, 31)
		if err != nil {
			return nil, fmt.Errorf("chunk size %q: %v", l, err)
		}
		if n == 0 {
			break
		}
		if uint64(len(rest)) < n+2 || string(rest[n:n+2]) != "\r\n" {
			return nil, fmt.Errorf("a chunk of %d bytes not followed by CRLF", n)
		}
		data, rest = append(data, rest[:n]...), rest[n+2:]
	}
	trailer := map[string]string{}
	for {
		l, err := line()
		if err != nil {
			return nil, err
		}
		if l == "" {
			break
		}
		k, v, _ := strings.Cut(l, ":")
		trailer[strings.ToLower(k)] = strings.TrimSpace(v)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%d bytes after the trailer", len(rest))
	}
	if want := r.Header.Get("X-Amz-Decoded-Content-Length"); want != strconv.Itoa(len(data)) {
		return nil, fmt.Errorf("%d bytes decoded, X-Amz-Decoded-Content-Length %q", len(data), want)
	}
	name := strings.ToLower(r.Header.Get("X-Amz-Trailer"))
	var table *crc32.Table
	switch name {
	case "":
		return data, nil
	case "x-amz-checksum-crc32":
		table = crc32.IEEETable
	case "x-amz-checksum-crc32c":
		table = crc32.MakeTable(crc32.Castagnoli)
	default:
		return nil, fmt.Errorf("trailer %q: not a checksum this test computes", name)
	}
	sum := binary.BigEndian.AppendUint32(nil, crc32.Checksum(data, table))
	if got, want := trailer[name], base64.StdEncoding.EncodeToString(sum); got != want {
		return nil, fmt.Errorf("%s in the trailer %q, the data's %q", name, got, want)
	}
	return data, nil
}

// checkSignatures fails t if any request's signature did not verify, or
// if fewer than min requests reached Cells.
func (c *s3Cells) checkSignatures(t *testing.T, min int) {
	t.Helper()
	for _, b := range c.refused() {
		t.Errorf("Cells could not verify a signature: %s", b)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.checked < min {
		t.Errorf("%d requests reached Cells, want at least %d", c.checked, min)
	}
}

// checkObject wants the object key in bucket data to hold want.
func (c *s3Cells) checkObject(t *testing.T, key string, want []byte) {
	t.Helper()
	obj, err := c.backend.GetObject("data", key, nil)
	if err != nil {
		t.Errorf("Cells has no object %q: %v", key, err)
		return
	}
	defer obj.Contents.Close()
	h := sha256.New()
	n, err := io.Copy(h, obj.Contents)
	if err != nil || n != int64(len(want)) || !bytes.Equal(h.Sum(nil), sha256Of(want)) {
		t.Errorf("object %q in Cells: %d bytes (%v), SHA-256 %x; want %d bytes, SHA-256 %x", key, n, err, h.Sum(nil), len(want), sha256Of(want))
	}
}

// checkUploads fails t unless every signature verified, at least min
// requests reached Cells, and Cells holds s3Files' big and small files
// under s3Prefix; with multipart, unless big came as a multipart upload.
func (c *s3Cells) checkUploads(t *testing.T, min int, big, small []byte, multipart bool) {
	t.Helper()
	c.checkSignatures(t, min)
	c.checkObject(t, s3Prefix+"/big.bin", big)
	c.checkObject(t, s3Prefix+"/small.txt", small)
	c.mu.Lock()
	defer c.mu.Unlock()
	if multipart && (c.methods[http.MethodPost] < 2 || c.methods[http.MethodPut] < 5) {
		t.Errorf("requests by method %v: want a multipart upload (two POSTs and a PUT per part)", c.methods)
	}
}

// refused lists the requests whose signature did not verify.
func (c *s3Cells) refused() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.bad)
}

func sha256Of(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

// s3Files writes the files the S3 clients upload: one large enough for a
// multipart upload of four 5 MiB parts and a short last one, one small.
func s3Files(t *testing.T) (dir string, big, small []byte) {
	t.Helper()
	dir = t.TempDir()
	big = make([]byte, 4*5<<20+12345)
	rand.Read(big)
	small = []byte("a small file, sent whole\n")
	for name, b := range map[string][]byte{"big.bin": big, "small.txt": small} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir, big, small
}

// s3Prefix is the folder the S3 clients upload to: a space, UTF-8 and
// characters that S3 clients escape in paths and that Cells' signature
// check needs byte for byte.
const s3Prefix = "dir with space/é+;x&y=1"

// TestS3ClientRclone: rclone, as Cells users sync with it, over HTTP/2 (Go's
// client, ALPN h2) to Cells' S3 API with path-style bucket "data": a
// multipart upload, a small PUT with an unsigned payload, listings, HEADs
// and downloads that rclone check compares byte for byte.
func TestS3ClientRclone(t *testing.T) {
	rclone := needProgram(t, "rclone", "rclone")
	cells, tp := startS3Cells(t)
	src, big, small := s3Files(t)
	home := t.TempDir()
	env := clientEnv(home,
		"RCLONE_CONFIG="+filepath.Join(home, "rclone.conf"),
		"RCLONE_CONFIG_CELLS_TYPE=s3",
		"RCLONE_CONFIG_CELLS_PROVIDER=Other",
		"RCLONE_CONFIG_CELLS_ENDPOINT="+tp.URL,
		"RCLONE_CONFIG_CELLS_ACCESS_KEY_ID="+s3Creds.AccessKeyID,
		"RCLONE_CONFIG_CELLS_SECRET_ACCESS_KEY="+s3Creds.SecretAccessKey,
		"RCLONE_CONFIG_CELLS_REGION="+s3Region,
		"RCLONE_CONFIG_CELLS_FORCE_PATH_STYLE=true",
	)
	// No retries: a request the proxy spoilt must fail the test, not be
	// sent again.
	common := []string{"--ca-cert", proxyCA(t, tp), "--retries", "1", "--low-level-retries", "1", "--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M"}
	remote := "cells:data/" + s3Prefix
	for _, args := range [][]string{
		{"copy", src, remote},
		{"check", "--download", src, remote},
		{"lsl", "cells:data"},
	} {
		out, err := runClient(t, home, env, rclone, append(args, common...)...)
		if err != nil {
			t.Fatalf("rclone %s: %v\n%s\nsignatures Cells refused: %q", args[0], err, out, cells.refused())
		}
		if args[0] == "lsl" && (!strings.Contains(out, s3Prefix+"/big.bin") || !strings.Contains(out, s3Prefix+"/small.txt")) {
			t.Errorf("rclone lsl does not list both files:\n%s", out)
		}
	}
	cells.checkUploads(t, 10, big, small, true)
}

// TestS3ClientS3cmd: s3cmd, a Python client with a SigV4 signer of its own,
// over HTTP/1.1, verifying the proxy's certificate: a multipart upload,
// a download compared byte for byte, a listing.
func TestS3ClientS3cmd(t *testing.T) {
	s3cmd := needProgram(t, "s3cmd", "s3cmd")
	cells, tp := startS3Cells(t)
	src, big, small := s3Files(t)
	home := t.TempDir()
	host := strings.TrimPrefix(tp.URL, "https://")
	conf := filepath.Join(home, "s3cfg")
	if err := os.WriteFile(conf, []byte(strings.Join([]string{
		"[default]",
		"access_key = " + s3Creds.AccessKeyID,
		"secret_key = " + s3Creds.SecretAccessKey,
		"host_base = " + host,
		"host_bucket = " + host, // path style: s3://data/key goes to /data/key
		"bucket_location = " + s3Region,
		"use_https = True",
		"ca_certs_file = " + proxyCA(t, tp),
		"check_ssl_certificate = True",
		"check_ssl_hostname = True",
		"signature_v2 = False",
		"multipart_chunk_size_mb = 5",
		"",
	}, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	env := clientEnv(home)
	dst := "s3://data/" + s3Prefix + "/"
	got := filepath.Join(home, "got.bin")
	for _, args := range [][]string{
		{"put", filepath.Join(src, "big.bin"), dst + "big.bin"},
		{"put", filepath.Join(src, "small.txt"), dst + "small.txt"},
		{"get", "--force", dst + "big.bin", got},
		{"ls", "--recursive", "s3://data/"},
	} {
		out, err := runClient(t, home, env, s3cmd, append([]string{"-c", conf, "--no-progress"}, args...)...)
		if err != nil {
			t.Fatalf("s3cmd %s: %v\n%s\nsignatures Cells refused: %q", args[0], err, out, cells.refused())
		}
		if args[0] == "ls" && (!strings.Contains(out, dst+"big.bin") || !strings.Contains(out, dst+"small.txt")) {
			t.Errorf("s3cmd ls does not list both files:\n%s", out)
		}
	}
	if b, err := os.ReadFile(got); err != nil || !bytes.Equal(b, big) {
		t.Errorf("s3cmd get: %d bytes (%v), want the %d uploaded", len(b), err, len(big))
	}
	cells.checkUploads(t, 8, big, small, false)
}

// TestS3ClientAWSCLI: the AWS CLI, on botocore (as boto3 programs are),
// over HTTP/1.1, verifying the proxy's certificate: a multipart upload
// whose parts go at once on several connections, those over 1 MB with
// Expect: 100-continue (botocore sends the body after the 100, or after a
// second without one), a small PUT, a HEAD, a download compared byte for
// byte, a listing. It runs every aws found: Debian's (awscli: AWS CLI v2
// on its 2023 botocore, Content-MD5 on each part) and the one first in
// PATH when that is another (this machine's pip AWS CLI v1 on a current
// botocore: its parts are chunked, aws-chunked inside, with a CRC32 in
// the aws-chunked trailer, as AWS SDKs send uploads since 2025).
func TestS3ClientAWSCLI(t *testing.T) {
	clis := map[string]string{} // subtest name: the program
	if _, err := os.Stat("/usr/bin/aws"); err == nil {
		clis["debian"] = "/usr/bin/aws"
	}
	if p, err := exec.LookPath("aws"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err != nil || r != "/usr/bin/aws" {
			clis["path"] = p
		}
	}
	if len(clis) == 0 {
		needProgram(t, "awscli", "aws")
	}
	for name, aws := range clis {
		t.Run(name, func(t *testing.T) {
			cells, tp := startS3Cells(t)
			src, big, small := s3Files(t)
			home := t.TempDir()
			conf := filepath.Join(home, "config")
			if err := os.WriteFile(conf, []byte(strings.Join([]string{
				"[default]",
				"region = " + s3Region,
				"s3 =",
				"  addressing_style = path",
				"  multipart_threshold = 5MB",
				"  multipart_chunksize = 5MB",
				"",
			}, "\n")), 0o600); err != nil {
				t.Fatal(err)
			}
			env := clientEnv(home,
				"AWS_CONFIG_FILE="+conf,
				"AWS_SHARED_CREDENTIALS_FILE="+filepath.Join(home, "none"),
				"AWS_ACCESS_KEY_ID="+s3Creds.AccessKeyID,
				"AWS_SECRET_ACCESS_KEY="+s3Creds.SecretAccessKey,
				"AWS_CA_BUNDLE="+proxyCA(t, tp),
				"AWS_EC2_METADATA_DISABLED=true",
				"AWS_MAX_ATTEMPTS=1", // a request the proxy spoilt must fail, not be sent again
				"AWS_PAGER=",
			)
			dst := "s3://data/" + s3Prefix + "/"
			got := filepath.Join(home, "got.bin")
			for _, args := range [][]string{
				{"s3", "cp", filepath.Join(src, "big.bin"), dst + "big.bin"},
				{"s3", "cp", filepath.Join(src, "small.txt"), dst + "small.txt"},
				{"s3api", "head-object", "--bucket", "data", "--key", s3Prefix + "/big.bin"},
				{"s3", "cp", dst + "big.bin", got},
				{"s3", "ls", "--recursive", "s3://data/"},
			} {
				out, err := runClient(t, home, env, aws, append(args, "--endpoint-url", tp.URL)...)
				if err != nil {
					t.Fatalf("aws %s: %v\n%s\nsignatures Cells refused: %q", strings.Join(args[:2], " "), err, out, cells.refused())
				}
				if args[1] == "ls" && (!strings.Contains(out, s3Prefix+"/big.bin") || !strings.Contains(out, s3Prefix+"/small.txt")) {
					t.Errorf("aws s3 ls does not list both files:\n%s", out)
				}
				if args[1] == "head-object" && !strings.Contains(out, fmt.Sprintf(`"ContentLength": %d`, len(big))) {
					t.Errorf("aws s3api head-object does not give the length %d:\n%s", len(big), out)
				}
			}
			if b, err := os.ReadFile(got); err != nil || !bytes.Equal(b, big) {
				t.Errorf("aws s3 cp from Cells: %d bytes (%v), want the %d uploaded", len(b), err, len(big))
			}
			cells.checkUploads(t, 10, big, small, true)
			cells.mu.Lock()
			defer cells.mu.Unlock()
			if cells.expect < 4 {
				t.Errorf("%d requests reached Cells with Expect: 100-continue, want one per part over 1 MB at least", cells.expect)
			}
			t.Logf("%d requests at Cells, %d with Expect: 100-continue, %d with an aws-chunked body", cells.checked, cells.expect, cells.chunked)
		})
	}
}
