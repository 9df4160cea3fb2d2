package proxy

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestWSReviewDeflateThrough: client and Cells negotiate permessage-deflate
// with context takeover across the proxy. The offer reaches Cells and the
// answer the client as sent, and compressed messages, each depending on the
// ones before, cross both ways intact while the pumps park between them.
func TestWSReviewDeflateThrough(t *testing.T) {
	for _, kind := range []struct {
		name string
		kind upstreamKind
	}{{"tls-upstream", upTLS}, {"plain-upstream", upPlain}} {
		t.Run(kind.name, func(t *testing.T) {
			t.Parallel()
			offers := make(chan string, 1)
			up := newUpstream(t, kind.kind, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Header.Get("Upgrade") == "" {
					return
				}
				offers <- r.Header.Get("Sec-WebSocket-Extensions")
				c, err := websocket.Accept(w, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionContextTakeover})
				if err != nil {
					return
				}
				defer c.CloseNow()
				c.SetReadLimit(maxTestMessage)
				wsEcho(r.Context(), c)
			}))
			tp := startProxy(t, testConfig(up))
			c, res := dialWS(t, tp, "/ws/event", &websocket.DialOptions{CompressionMode: websocket.CompressionContextTakeover})
			if got := res.Header.Get("Sec-WebSocket-Extensions"); !strings.Contains(got, "permessage-deflate") {
				t.Errorf("client's Sec-WebSocket-Extensions = %q, want permessage-deflate", got)
			}
			if got := <-offers; !strings.Contains(got, "permessage-deflate") {
				t.Errorf("Cells' Sec-WebSocket-Extensions = %q, want the client's permessage-deflate offer", got)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for i := range 20 {
				msg := bytes.Repeat([]byte(strings.Repeat("event ", i+1)), 200*(i+1))
				if err := c.Write(ctx, websocket.MessageText, msg); err != nil {
					t.Fatalf("write %d: %v", i, err)
				}
				_, got, err := c.Read(ctx)
				if err != nil {
					t.Fatalf("read %d: %v", i, err)
				}
				if !bytes.Equal(got, msg) {
					t.Fatalf("echo %d: %d bytes, want %d bytes as sent", i, len(got), len(msg))
				}
			}
			c.Close(websocket.StatusNormalClosure, "")
		})
	}
}
