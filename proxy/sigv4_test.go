package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// The S3 credentials of these tests; region and service as Cells' S3
// gateway expects them.
var (
	s3Creds  = aws.Credentials{AccessKeyID: "gateway", SecretAccessKey: "gatewaysecret"}
	s3Region = "us-east-1"
)

const amzDate = "20060102T150405Z"

// s3Signer is the signer as S3 uses it: paths are not escaped a second time.
func s3Sign(o *v4.SignerOptions) { o.DisableURIPathEscaping = true }

// sigV4Verifier stands in for Cells' S3 gateway: it recomputes the
// signature of the request it received, with the same signer and
// credentials, from r.Method, r.Host, r.RequestURI and the signed headers,
// and answers 403 when it differs. Any change to the Host, the path bytes,
// the query or a signed header on the way breaks it, as it breaks Cells.
func sigV4Verifier() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := verifySigV4(r, body); err != nil {
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprintf(w, "<Error><Code>SignatureDoesNotMatch</Code><Message>%s</Message></Error>", err)
			return
		}
		io.WriteString(w, "signature ok")
	})
}

func verifySigV4(r *http.Request, body []byte) error {
	u, err := url.Parse("https://" + r.Host + r.RequestURI)
	if err != nil {
		return fmt.Errorf("rebuilding the URL: %v", err)
	}
	if u.Host != r.Host {
		return fmt.Errorf("host %q does not round-trip", r.Host)
	}
	if auth := r.Header.Get("Authorization"); auth != "" {
		return verifyHeaderSig(r, u, auth, body)
	}
	return verifyPresigned(r, u)
}

// verifyHeaderSig checks an Authorization: AWS4-HMAC-SHA256 request.
func verifyHeaderSig(r *http.Request, u *url.URL, auth string, body []byte) error {
	sent := authFields(auth)
	signedHeaders := sent["SignedHeaders"]
	if signedHeaders == "" {
		return fmt.Errorf("no SignedHeaders in %q", auth)
	}
	payloadHash := r.Header.Get("X-Amz-Content-Sha256")
	// UNSIGNED-PAYLOAD: the signature covers the head only (rclone's
	// small uploads over HTTPS). STREAMING-UNSIGNED-PAYLOAD-TRAILER too: an
	// aws-chunked body whose trailer carries its checksum (botocore's
	// uploads over HTTPS since 1.36), which s3Cells checks as it decodes.
	unsigned := payloadHash == "UNSIGNED-PAYLOAD" || payloadHash == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
	if sum := sha256.Sum256(body); !unsigned && payloadHash != hex.EncodeToString(sum[:]) {
		return fmt.Errorf("payload hash %q does not match the body", payloadHash)
	}
	when, err := time.Parse(amzDate, r.Header.Get("X-Amz-Date"))
	if err != nil {
		return fmt.Errorf("X-Amz-Date: %v", err)
	}
	req := rebuild(r, u, signedHeaders)
	if err := v4.NewSigner().SignHTTP(context.Background(), s3Creds, req, payloadHash, "s3", s3Region, when, s3Sign); err != nil {
		return err
	}
	if got := req.Header.Get("Authorization"); !maps.Equal(authFields(got), sent) {
		return fmt.Errorf("signature mismatch: recomputed %q", got)
	}
	return nil
}

// authFields are the Credential, SignedHeaders and Signature of an
// Authorization: AWS4-HMAC-SHA256 value. Clients separate them with ", "
// (the AWS SDKs) or "," (s3cmd): servers split on the comma.
func authFields(auth string) map[string]string {
	fields := map[string]string{}
	rest, ok := strings.CutPrefix(auth, "AWS4-HMAC-SHA256 ")
	if !ok {
		return fields
	}
	for f := range strings.SplitSeq(rest, ",") {
		if k, v, ok := strings.Cut(strings.TrimSpace(f), "="); ok {
			fields[k] = v
		}
	}
	return fields
}

// verifyPresigned checks a presigned URL: the signature in the query.
func verifyPresigned(r *http.Request, u *url.URL) error {
	q := u.Query()
	sig, signedHeaders := q.Get("X-Amz-Signature"), q.Get("X-Amz-SignedHeaders")
	if sig == "" || signedHeaders == "" {
		return fmt.Errorf("neither Authorization nor a presigned query")
	}
	when, err := time.Parse(amzDate, q.Get("X-Amz-Date"))
	if err != nil {
		return fmt.Errorf("X-Amz-Date: %v", err)
	}
	// The signer adds these itself.
	for _, k := range []string{"X-Amz-Signature", "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-SignedHeaders"} {
		q.Del(k)
	}
	u.RawQuery = q.Encode()
	req := rebuild(r, u, signedHeaders)
	signed, _, err := v4.NewSigner().PresignHTTP(context.Background(), s3Creds, req, "UNSIGNED-PAYLOAD", "s3", s3Region, when, s3Sign)
	if err != nil {
		return err
	}
	su, err := url.Parse(signed)
	if err != nil {
		return err
	}
	if got := su.Query().Get("X-Amz-Signature"); got != sig {
		return fmt.Errorf("signature mismatch: recomputed %q", got)
	}
	return nil
}

// rebuild makes the request to sign again: the received method, Host,
// target and the headers the client signed, nothing else.
func rebuild(r *http.Request, u *url.URL, signedHeaders string) *http.Request {
	req := &http.Request{Method: r.Method, URL: u, Host: r.Host, Header: make(http.Header)}
	for h := range strings.SplitSeq(signedHeaders, ";") {
		switch h {
		case "host":
		case "content-length":
			req.ContentLength = r.ContentLength
		default:
			req.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	return req
}

// TestSigV4 signs S3 requests for the proxy's public host, as Cells' web UI,
// cec and Cells Sync do, and checks that the upstream verifies them: a PUT
// signed in the Authorization header with its payload hash, and a presigned
// GET, each with %2F in the key and a query, over h1 and h2.
func TestSigV4(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upTLS, sigV4Verifier())
	tp := startProxy(t, testConfig(up))

	const (
		putPath = "/io/personal/dir%2Fsub/My%20File,'1'.txt?partNumber=2&uploadId=u-1%2B2"
		getPath = "/data/personal/dir%2Fsub/f%252F.bin?versionId=v1&response-content-disposition=attachment%3B%20filename%3D%22a%20b.bin%22"
	)
	body := bytes.Repeat([]byte("cells "), 1000)
	sum := sha256.Sum256(body)

	signedPut := func(t *testing.T, host string) *http.Request {
		req, err := http.NewRequest("PUT", tp.URL+putPath, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		req.Header.Set("X-Amz-Content-Sha256", hex.EncodeToString(sum[:]))
		req.Header.Set("X-Amz-Meta-Pydio-Node-Uuid", "a b  c")
		req.Header.Set("Content-Type", "text/plain")
		if err := v4.NewSigner().SignHTTP(context.Background(), s3Creds, req, hex.EncodeToString(sum[:]), "s3", s3Region, time.Now(), s3Sign); err != nil {
			t.Fatal(err)
		}
		req.Host = tp.Addr().String()
		return req
	}
	presignedGet := func(t *testing.T, host string) *http.Request {
		req, err := http.NewRequest("GET", tp.URL+getPath, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		req.URL.RawQuery = "X-Amz-Expires=900&" + req.URL.RawQuery
		signed, hdr, err := v4.NewSigner().PresignHTTP(context.Background(), s3Creds, req, "UNSIGNED-PAYLOAD", "s3", s3Region, time.Now(), s3Sign)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(signed, "dir%2Fsub/f%252F.bin") {
			t.Fatalf("presigned URL %q lost the escapes", signed)
		}
		get, err := http.NewRequest("GET", signed, nil)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range hdr {
			if k != "Host" {
				get.Header[k] = v
			}
		}
		get.Host = tp.Addr().String()
		return get
	}

	public := tp.Addr().String()
	for _, pc := range h1h2Clients(tp) {
		tests := []struct {
			name   string
			req    func(*testing.T, string) *http.Request
			signed string // the host the client signed for
			status int
		}{
			{"PUT", signedPut, public, http.StatusOK},
			{"presigned GET", presignedGet, public, http.StatusOK},
			// The controls: signed for another host than the one the
			// client talks to, the upstream must refuse. Without them a
			// verifier that accepts anything would pass the above.
			{"PUT signed for another host", signedPut, "cells.example.com", http.StatusForbidden},
			{"presigned GET for another host", presignedGet, "127.0.0.1:1", http.StatusForbidden},
		}
		for _, tt := range tests {
			t.Run(pc.name+"/"+tt.name, func(t *testing.T) {
				res, err := pc.c.Do(tt.req(t, tt.signed))
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if res.StatusCode != tt.status {
					t.Errorf("status = %d, want %d: %s", res.StatusCode, tt.status, b)
				}
			})
		}
	}
}
