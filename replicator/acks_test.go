package replicator

import (
	"testing"
	"time"
)

// TestPutReportsCopies: with Replicas 3, a write on a lone node is held by
// one node. Put returns nil (every alive node holds it, as documented), so
// only PutWithAck and Stats can tell the caller it is under-replicated; the
// record is sent to nodes that join later, and the count clears once
// Replicas nodes hold it.
func TestPutReportsCopies(t *testing.T) {
	dir := t.TempDir()
	mod := func(c *Config) {
		c.Replicas = 3
		c.AntiEntropyInterval = time.Hour // copies must come from the re-send, not from anti-entropy rounds
	}
	cfg := testConfig(t, dir, "a")
	mod(&cfg)
	a := open(t, cfg)
	if err := a.Put(ctxT(t), "x", "plain", []byte("v")); err != nil {
		t.Fatalf("Put on a lone node: %v", err)
	}
	ack, err := a.PutWithAck(ctxT(t), "x", "k", []byte("v"))
	if err != nil {
		t.Fatalf("PutWithAck on a lone node: %v", err)
	}
	if ack.Copies != 1 || ack.Want != 3 || ack.Full() {
		t.Fatalf("ack on a lone node = %+v, want 1 of 3 copies", ack)
	}
	if got := a.Stats().UnderReplicated; got != 2 {
		t.Fatalf("UnderReplicated = %d, want 2", got)
	}

	var nodes []*Node
	for _, name := range []string{"b", "c"} {
		cfg := testConfig(t, dir, name)
		mod(&cfg)
		cfg.Join = []string{a.Addr()}
		nodes = append(nodes, open(t, cfg))
	}
	waitConverged(t, append(nodes, a)...)
	waitFor(t, 10*time.Second, "the under-replicated records re-sent", func() bool {
		return a.Stats().UnderReplicated == 0 && valueIs(nodes[0], "x", "k", "v") && valueIs(nodes[1], "x", "plain", "v")
	})
	ack, err = a.PutWithAck(ctxT(t), "x", "k2", []byte("v"))
	if err != nil || ack.Copies != 3 || ack.Want != 3 || !ack.Full() {
		t.Fatalf("PutWithAck on three nodes = %+v, %v; want 3 of 3", ack, err)
	}
	ack, err = a.DeleteWithAck(ctxT(t), "x", "k2")
	if err != nil || ack.Copies != 3 {
		t.Fatalf("DeleteWithAck on three nodes = %+v, %v", ack, err)
	}
}

// TestUnderReplicatedResentOnReturn: a node is down when a write is made;
// the write reports 2 of 3 copies, and when the node comes back the record
// is re-sent to it and the count clears.
func TestUnderReplicatedResentOnReturn(t *testing.T) {
	dir := t.TempDir()
	var nodes []*Node
	var cfgs []Config
	for i, name := range []string{"a", "b", "c"} {
		cfg := testConfig(t, dir, name)
		cfg.Replicas = 3
		cfg.AntiEntropyInterval = time.Hour // copies must come from the re-send
		if i > 0 {
			cfg.Join = []string{nodes[0].Addr()}
		}
		n := open(t, cfg)
		cfg.BindAddr = n.Addr() // the same address when it comes back
		nodes, cfgs = append(nodes, n), append(cfgs, cfg)
	}
	waitConverged(t, nodes...)
	if err := nodes[2].shutdown(false); err != nil { // a crash
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "c dead on a", func() bool { return aliveCount(nodes[0]) == 2 })
	ack, err := nodes[0].PutWithAck(ctxT(t), "x", "k", []byte("v"))
	if err != nil || ack.Copies != 2 || ack.Want != 3 {
		t.Fatalf("PutWithAck with c down = %+v, %v; want 2 of 3", ack, err)
	}
	if got := nodes[0].Stats().UnderReplicated; got != 1 {
		t.Fatalf("UnderReplicated = %d, want 1", got)
	}
	back := open(t, cfgs[2])
	waitFor(t, 20*time.Second, "the record re-sent to c", func() bool {
		return nodes[0].Stats().UnderReplicated == 0 && valueIs(back, "x", "k", "v")
	})
}
