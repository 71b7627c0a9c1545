package relay_test

import (
	"bytes"
	"io"
	"testing"
	"time"
)

// TestStreamCloseWrite: a mesh stream half-closes (the peer reads EOF)
// and keeps reading the peer's reply.
func TestStreamCloseWrite(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	serveEcho(t, b, "echo") // io.Copy(c, c): echoes until EOF, then closes
	if err := a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()); err != nil {
		t.Fatal(err)
	}
	c, err := a.Dial(ctxT(t, 5*time.Second), "bob", "echo")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		t.Fatalf("%T has no CloseWrite", c)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := bytes.Repeat([]byte("half "), 10000)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	// The echo only ends (and the read only sees EOF) after our FIN.
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("read %d bytes back, want %d", len(got), len(msg))
	}
}
