package replicator

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	bolt "go.etcd.io/bbolt"
)

// healBound is how long after connectivity returns a split circle may take
// to be one again (issue 8: "merged ≤ 30 s after connectivity returns").
const healBound = 30 * time.Second

// healTune is fastMemberlist with a short GossipToTheDeadTime, so that a
// split of a few seconds outlasts it: after that memberlist never contacts
// a dead node again by itself, which is what the healing must overcome.
func healTune(mc *memberlist.Config) {
	fastMemberlist(mc)
	mc.GossipToTheDeadTime = 2 * time.Second
	mc.DeadNodeReclaimTime = 2 * time.Second
}

// pastTheDead is how long a split lasts once both sides see each other
// dead: beyond healTune's GossipToTheDeadTime, with a margin.
const pastTheDead = 4 * time.Second

// hostSeed turns a node's 127.0.0.1:PORT address into the host-name seed
// localhost:PORT (what a user writes in `join`: a name, not the IP).
func hostSeed(t *testing.T, n *Node) string {
	t.Helper()
	_, port, err := net.SplitHostPort(n.Addr())
	if err != nil {
		t.Fatal(err)
	}
	return "localhost:" + port
}

// aliveNames is the set of members n sees alive, as "a,b,c".
func aliveNames(n *Node) string {
	var s []string
	for _, m := range n.Members() {
		if m.State == StateAlive {
			s = append(s, m.Name)
		}
	}
	return strings.Join(s, ",")
}

// waitSplit waits until no node sees a node of another side alive or
// suspect.
func waitSplit(t *testing.T, sides ...[]*Node) {
	t.Helper()
	waitFor(t, 20*time.Second, "both sides see each other dead", func() bool { return isSplit(sides...) })
}

func isSplit(sides ...[]*Node) bool {
	side := map[string]int{}
	for i, s := range sides {
		for _, n := range s {
			side[n.Name()] = i
		}
	}
	for i, s := range sides {
		for _, n := range s {
			for _, m := range n.Members() {
				if j, ok := side[m.Name]; ok && j != i && (m.State == StateAlive || m.State == StateSuspect) {
					return false
				}
			}
		}
	}
	return true
}

// waitMerged waits (healBound) until every node sees all of them alive and
// holds every key of writes (bucket "x", key -> value); it returns how long
// that took.
func waitMerged(t *testing.T, nodes []*Node, writes map[string]string) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(healBound)
	for {
		var bad []string
		for _, n := range nodes {
			if aliveCount(n) != len(nodes) {
				bad = append(bad, fmt.Sprintf("%s sees %s alive", n.Name(), aliveNames(n)))
			}
			for k, v := range writes {
				if !valueIs(n, "x", k, v) {
					bad = append(bad, fmt.Sprintf("%s lacks x/%s", n.Name(), k))
				}
			}
		}
		if len(bad) == 0 {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("not merged %v after the heal: %s", healBound, strings.Join(bad, "; "))
		}
		time.Sleep(20 * time.Millisecond) // polling interval
	}
}

// TestHealFirstNodeWithoutJoin: the commonest circle, a first node without
// join that two others joined by host name, heals after the first node was
// cut off for longer than memberlist gossips to the dead.
func TestHealFirstNodeWithoutJoin(t *testing.T) {
	f := newFaultNet()
	dir := t.TempDir()
	cfg := f.config(t, dir, "a")
	cfg.tune = healTune
	a := open(t, cfg)
	nodes := []*Node{a}
	for _, name := range []string{"b", "c"} {
		cfg := f.config(t, dir, name)
		cfg.tune = healTune
		cfg.Join = []string{hostSeed(t, a)}
		nodes = append(nodes, open(t, cfg))
	}
	waitConverged(t, nodes...)

	f.Isolate("a")
	waitSplit(t, nodes[:1], nodes[1:])
	ctx := ctxT(t)
	writes := map[string]string{"from-a": "1", "from-b": "2"}
	if err := a.Put(ctx, "x", "from-a", []byte("1")); err != nil {
		t.Fatal(err)
	}
	if err := nodes[1].Put(ctx, "x", "from-b", []byte("2")); err != nil {
		t.Fatal(err)
	}
	holdsFor(t, pastTheDead, "the split", func() bool { return isSplit(nodes[:1], nodes[1:]) })

	f.Heal()
	took := waitMerged(t, nodes, writes)
	t.Logf("merged %v after the heal", took.Round(time.Millisecond))
}

// TestHealTwoHalvesHostSeeds: four nodes whose join lists name host names
// (localhost:PORT, while memberlist knows 127.0.0.1:PORT), split 2+2 for
// longer than memberlist gossips to the dead, merge after the heal, with
// the writes of both sides everywhere.
func TestHealTwoHalvesHostSeeds(t *testing.T) {
	f := newFaultNet()
	dir := t.TempDir()
	var nodes []*Node
	var seeds []string
	for i := range 4 {
		cfg := f.config(t, dir, fmt.Sprintf("n%d", i))
		cfg.tune = healTune
		cfg.Join = append([]string(nil), seeds...)
		n := open(t, cfg)
		nodes = append(nodes, n)
		seeds = append(seeds, hostSeed(t, n))
	}
	waitConverged(t, nodes...)

	f.Cut([]string{"n0", "n1"}, []string{"n2", "n3"})
	left, right := nodes[:2], nodes[2:]
	waitSplit(t, left, right)
	ctx := ctxT(t)
	writes := map[string]string{"left": "L", "right": "R"}
	if err := nodes[0].Put(ctx, "x", "left", []byte("L")); err != nil {
		t.Fatal(err)
	}
	if err := nodes[3].Put(ctx, "x", "right", []byte("R")); err != nil {
		t.Fatal(err)
	}
	holdsFor(t, pastTheDead, "the split", func() bool { return isSplit(left, right) })

	f.Heal()
	took := waitMerged(t, nodes, writes)
	t.Logf("merged %v after the heal", took.Round(time.Millisecond))
}

// TestHealRemembersPeersAcrossRestart: a node restarted after its only seed
// died for good finds the rest of the circle at the addresses it
// remembers from before the restart (the seed list alone leads nowhere).
func TestHealRemembersPeersAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	seedCfg := testConfig(t, dir, "seed")
	seedCfg.tune = healTune
	seed, err := Open(seedCfg)
	if err != nil {
		t.Fatal(err)
	}
	var cfgs []Config
	var nodes []*Node
	for _, name := range []string{"b", "c"} {
		cfg := testConfig(t, dir, name)
		cfg.tune = healTune
		cfg.Join = []string{seed.Addr()}
		n, err := Open(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cfg.BindAddr = n.Addr()
		cfgs, nodes = append(cfgs, cfg), append(nodes, n)
	}
	t.Cleanup(func() { nodes[1].Close() })
	waitConverged(t, seed, nodes[0], nodes[1])

	// The seed dies for good; b crashes.
	if err := seed.shutdown(false); err != nil {
		t.Fatal(err)
	}
	if err := nodes[0].shutdown(false); err != nil {
		t.Fatal(err)
	}
	c := nodes[1]
	waitFor(t, 20*time.Second, "c alone", func() bool { return aliveCount(c) == 1 })
	holdsFor(t, pastTheDead, "c alone", func() bool { return aliveCount(c) == 1 })
	if err := c.Put(ctxT(t), "x", "from-c", []byte("c")); err != nil {
		t.Fatal(err)
	}

	b := open(t, cfgs[0]) // same data dir and address, join still only the dead seed
	took := waitMerged(t, []*Node{b, c}, map[string]string{"from-c": "c"})
	t.Logf("merged %v after the restart", took.Round(time.Millisecond))
}

// TestKnownMembersStored: the last known addresses of the other members
// are stored in the meta bucket; a file without them (an older build) or
// with an unreadable entry opens with none.
func TestKnownMembersStored(t *testing.T) {
	nodes := cluster(t, 2, nil)
	a, b := nodes[0], nodes[1]
	waitFor(t, 10*time.Second, "n0 stores n1's address", func() bool {
		known, err := loadKnown(a.db)
		return err == nil && known["n1"] == b.Addr() && len(known) == 1
	})

	dir := t.TempDir()
	db, err := openDB(dir)
	if err != nil {
		t.Fatal(err)
	}
	if known, err := loadKnown(db); err != nil || len(known) != 0 {
		t.Fatalf("no entry: %v, %v", known, err)
	}
	for _, bad := range []string{"{not json", "null"} {
		if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bktMeta).Put(keyPeers, []byte(bad)) }); err != nil {
			t.Fatal(err)
		}
		known, _ := loadKnown(db)
		if known == nil || len(known) != 0 {
			t.Fatalf("entry %q gave %#v", bad, known)
		}
		known["y"] = "127.0.0.1:1" // usable
	}
	db.Close()
	cfg := testConfig(t, dir, "x")
	cfg.DataDir = dir
	n := open(t, cfg) // opens with the unusable entry
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	if len(n.known) != 0 {
		t.Fatalf("unusable entry gave %v", n.known)
	}
}

// TestKnownMembersFollowAddress: when a member comes back at another
// address, the address stored for it follows.
func TestKnownMembersFollowAddress(t *testing.T) {
	dir := t.TempDir()
	aCfg := testConfig(t, dir, "a")
	aCfg.tune = healTune
	a := open(t, aCfg)
	bCfg := testConfig(t, dir, "b")
	bCfg.tune = healTune
	bCfg.Join = []string{a.Addr()}
	b, err := Open(bCfg)
	if err != nil {
		t.Fatal(err)
	}
	waitConverged(t, a, b)
	old := b.Addr()
	stored := func() string {
		known, err := loadKnown(a.db)
		if err != nil {
			t.Fatal(err)
		}
		return known["b"]
	}
	waitFor(t, 10*time.Second, "b's address stored", func() bool { return stored() == old })
	if err := b.shutdown(false); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "b dead on a", func() bool { return aliveCount(a) == 1 })
	holdsFor(t, pastTheDead, "b dead on a", func() bool { return aliveCount(a) == 1 }) // past DeadNodeReclaimTime

	b2 := open(t, bCfg) // port 0: another address
	waitConverged(t, a, b2)
	if b2.Addr() == old {
		t.Fatalf("b came back at its old address %s", old)
	}
	waitFor(t, 10*time.Second, "b's new address stored", func() bool { return stored() == b2.Addr() })
}
