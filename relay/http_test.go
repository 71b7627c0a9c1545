package relay_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/homecircle/circle/relay"
)

// TestHTTPOverMesh serves HTTP on a mesh service and reaches it from
// another node with a plain http.Client whose dialer is the mesh: the
// building block for proxying requests to circle services.
func TestHTTPOverMesh(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	l, err := b.Listen("svc:forgejo")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from bob, "+r.URL.Path)
	})}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(l) }()
	defer func() { srv.Close(); <-done }()

	if err := a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		host, _, _ := net.SplitHostPort(addr)
		return a.Dial(ctx, host, "svc:forgejo")
	}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	for range 3 { // reuses the stream as a keep-alive connection
		res, err := client.Get("http://bob/repo")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if string(body) != "hello from bob, /repo" {
			t.Fatalf("body %q", body)
		}
	}
}

func TestDialAnyFailsOver(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	c := newMesh(t, "carol", testSecret)
	serveEcho(t, c, "svc")
	for _, m := range []*relay.Mesh{b, c} {
		if err := a.Connect(ctxT(t, 5*time.Second), m.Name(), m.Addr()); err != nil {
			t.Fatal(err)
		}
	}
	conn, peer, err := a.DialAny(ctxT(t, 5*time.Second), []string{"dave", "bob", "carol"}, "svc")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if peer != "carol" {
		t.Fatalf("took %q", peer)
	}
	_, _, err = a.DialAny(ctxT(t, 5*time.Second), []string{"dave", "bob"}, "svc")
	if !errors.Is(err, relay.ErrNoService) || !errors.Is(err, relay.ErrNoPeer) {
		t.Fatalf("no one offers it: %v", err)
	}
}
