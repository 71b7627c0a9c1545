package replicator

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var testSecret = bytes.Repeat([]byte{0x42}, 32)

// waitFor polls cond until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond) // polling interval, not synchronisation
	}
}

// holdsFor checks that cond stays true for d (polling).
func holdsFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !cond() {
			t.Fatalf("%s stopped holding", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fastMemberlist makes failure detection and gossip quick for tests.
func fastMemberlist(c *memberlist.Config) {
	c.ProbeInterval = 100 * time.Millisecond
	c.ProbeTimeout = 50 * time.Millisecond
	c.GossipInterval = 20 * time.Millisecond
	c.PushPullInterval = 2 * time.Second
	c.SuspicionMult = 2
	c.TCPTimeout = 2 * time.Second
	c.GossipToTheDeadTime = 2 * time.Second
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("REPLICATOR_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return nil
}

// testConfig returns a config for node name in dir, on a free loopback port.
func testConfig(t testing.TB, dir, name string) Config {
	cfg := DefaultConfig()
	cfg.Name = name
	cfg.DataDir = filepath.Join(dir, name)
	cfg.Secret = testSecret
	cfg.BindAddr = "127.0.0.1:0"
	cfg.AntiEntropyInterval = 500 * time.Millisecond
	cfg.FirstWriterWins = []string{"fww"}
	cfg.Logger = testLogger(t)
	cfg.tune = fastMemberlist
	return cfg
}

// open opens a node and closes it at the end of the test.
func open(t testing.TB, cfg Config) *Node {
	t.Helper()
	n, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open(%s): %v", cfg.Name, err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// cluster starts size nodes, each joining the first, and waits until all
// see each other alive. mod adjusts each config.
func cluster(t testing.TB, size int, mod func(*Config)) []*Node {
	t.Helper()
	dir := t.TempDir()
	var nodes []*Node
	for i := range size {
		cfg := testConfig(t, dir, fmt.Sprintf("n%d", i))
		if i > 0 {
			cfg.Join = []string{nodes[0].Addr()}
		}
		if mod != nil {
			mod(&cfg)
		}
		nodes = append(nodes, open(t, cfg))
	}
	waitConverged(t, nodes...)
	return nodes
}

// waitConverged waits until every node sees all of them alive.
func waitConverged(t testing.TB, nodes ...*Node) {
	t.Helper()
	waitFor(t, 10*time.Second, "membership", func() bool {
		for _, n := range nodes {
			if aliveCount(n) != len(nodes) {
				return false
			}
		}
		return true
	})
}

func aliveCount(n *Node) int {
	c := 0
	for _, m := range n.Members() {
		if m.State == StateAlive {
			c++
		}
	}
	return c
}

// valueIs reports whether n has bucket/key with value want.
func valueIs(n *Node, bucket, key, want string) bool {
	r, err := n.Get(bucket, key)
	return err == nil && string(r.Value) == want
}

// absent reports whether bucket/key is absent or deleted on n.
func absent(n *Node, bucket, key string) bool {
	_, err := n.Get(bucket, key)
	return err != nil
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

type atomicCounter struct{ v atomic.Int64 }

func (c *atomicCounter) next() int { return int(c.v.Add(1)) }
