package replicator

import (
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// TestGoneSeedRejoined: a seed that crashed and came back without a join
// list of its own is joined again by the nodes that know it as a seed,
// although they still have each other (memberlist never contacts a dead
// node again by itself).
func TestGoneSeedRejoined(t *testing.T) {
	dir := t.TempDir()
	tune := func(mc *memberlist.Config) {
		fastMemberlist(mc)
		mc.SuspicionMult = 20 // dead after about 2s
		mc.SuspicionMaxTimeoutMult = 1
	}
	seedCfg := testConfig(t, dir, "seed")
	seedCfg.tune = tune
	seed, err := Open(seedCfg)
	if err != nil {
		t.Fatal(err)
	}
	seedCfg.BindAddr = seed.Addr() // the same address when it comes back
	var others []*Node
	for _, name := range []string{"a", "b"} {
		cfg := testConfig(t, dir, name)
		cfg.tune = tune
		cfg.Join = []string{seed.Addr()}
		others = append(others, open(t, cfg))
	}
	waitConverged(t, append(others, seed)...)

	if err := seed.shutdown(false); err != nil { // a crash: no leave
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "the seed dead on a and b", func() bool {
		for _, n := range others {
			if aliveCount(n) != 2 {
				return false
			}
		}
		return true
	})
	time.Sleep(3 * time.Second) // past GossipToTheDeadTime: nobody talks to it any more

	back := open(t, seedCfg)
	waitFor(t, 15*time.Second, "the seed rejoined", func() bool {
		for _, n := range append(others, back) {
			if aliveCount(n) != 3 {
				return false
			}
		}
		return true
	})
}

// TestSeedWithNodeName: a seed may name its node ("name/host:port", as
// memberlist's node-aware transports take it); the node joins through it.
func TestSeedWithNodeName(t *testing.T) {
	dir := t.TempDir()
	a := open(t, testConfig(t, dir, "a"))
	cfg := testConfig(t, dir, "b")
	cfg.Join = []string{"a/" + a.Addr()}
	b := open(t, cfg)
	waitConverged(t, a, b)
}
