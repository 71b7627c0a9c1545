package circlenode

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/replicator"
)

// freeUDP returns a free loopback UDP address.
func freeUDP(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

// openNode opens a node on loopback joining seeds.
func openNode(t *testing.T, name string, secret []byte, seeds ...string) *Node {
	t.Helper()
	listen := freeUDP(t)
	rc := replicator.DefaultConfig()
	rc.Name = name
	rc.DataDir = filepath.Join(t.TempDir(), name)
	rc.Secret = secret
	rc.BindAddr = listen
	rc.Join = seeds
	rc.AntiEntropyInterval = 500 * time.Millisecond
	IdentityBuckets(&rc)
	n, err := Open(Config{
		Replicator: rc,
		Identity: identity.Config{
			Domain: "circle.test", Secret: secret, Node: name,
			Argon2Memory: 64, Argon2Time: 1, // small: this test is not about hashing
		},
		Listen:      listen,
		SyncTimeout: 10 * time.Second,
	})
	if err != nil {
		t.Fatalf("opening %s: %v", name, err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// TestTwoNodes: the assembly without Caddy. Two nodes on loopback meet over
// the mesh; an account created on one logs in on the other; a service
// offered by one is dialled from the other, and a name nobody offers is a
// dial error.
func TestTwoNodes(t *testing.T) {
	secret := bytes.Repeat([]byte{3}, 32)
	a := openNode(t, "a", secret)
	b := openNode(t, "b", secret, a.Mesh().Addr().String())

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := a.Identity().CreateAccount(ctx, identity.NewAccount{Username: "ana", Password: "correct horse battery"}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := b.Identity().Login(ctx, "ana", "correct horse battery", "127.0.0.1")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ana cannot log in on b: %v", err)
		}
		time.Sleep(100 * time.Millisecond) // polling interval
	}

	// A service on a: an echo server.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	a.Services().Set(t, map[string]string{"echo": ln.Addr().String()})
	if got := b.Services().Current(); len(got) != 0 {
		t.Fatalf("b offers %v", got)
	}
	c, err := b.DialService(ctx, "echo")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "ping")
	c.(interface{ CloseWrite() error }).CloseWrite()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "ping" {
		t.Fatalf("echo through the mesh: %q, %v", got, err)
	}
	if _, err := b.DialService(ctx, "nothing"); err == nil {
		t.Fatal("dialled a service nobody offers")
	}
}
