package integration

// Healing after a split (issue 8), with real caddy processes on the
// simulated internet (no NAT):
//
//	alpha 198.18.0.40, beta .41, gamma .42, delta .43
//
// `join` names peers by host name (NAME.home.arpa:7946), resolved through
// per-namespace hosts files. A split lasts 75 s (longer than memberlist's
// GossipToTheDeadTime, 30 s, after which it never contacts a dead node by
// itself); after the network returns the circle must be one again within
// 30 s, with the accounts added on each side during the split on every
// node. The three scenarios run in parallel.

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"
)

const (
	healSplit = 75 * time.Second // how long the network is split (the figure)
	healBound = 30 * time.Second // merged this long after the network returns (the bound)
	healPass  = "correct horse battery"
)

var healNames = []string{"alpha", "beta", "gamma", "delta"}

// healSeed is name's host-name seed.
func healSeed(name string) string { return fmt.Sprintf("%s.home.arpa:%d", name, natMesh) }

// healScenario is one split of the four nodes.
type healScenario struct {
	// join gives each node's seeds.
	join func(name string) []string
	// sides are the two parts of the split.
	sides [2][]string
	// writers add one account each during the split: writers[i] on side i.
	writers [2]string
	// move, if set, changes that node's address to moveTo in the middle of
	// the split (and the hosts files with it).
	move, moveTo string
}

// TestHealSplitHostSeeds: four nodes that all join each other by host
// name, split 2+2 for 75 s.
func TestHealSplitHostSeeds(t *testing.T) {
	t.Parallel()
	runHeal(t, healScenario{
		join:    joinAllOthers,
		sides:   [2][]string{{"alpha", "beta"}, {"gamma", "delta"}},
		writers: [2]string{"alpha", "gamma"},
	})
}

// TestHealFirstNodeAlone: a first node without `join` (a circle of one
// that the three others joined by its host name) is cut off for 75 s.
func TestHealFirstNodeAlone(t *testing.T) {
	t.Parallel()
	runHeal(t, healScenario{
		join: func(name string) []string {
			if name == "alpha" {
				return nil
			}
			return []string{healSeed("alpha")}
		},
		sides:   [2][]string{{"alpha"}, {"beta", "gamma", "delta"}},
		writers: [2]string{"alpha", "gamma"},
	})
}

// TestHealChangedAddress: as TestHealSplitHostSeeds, and delta's address
// changes in the middle of the split (its home got a new IP).
func TestHealChangedAddress(t *testing.T) {
	t.Parallel()
	runHeal(t, healScenario{
		join:    joinAllOthers,
		sides:   [2][]string{{"alpha", "beta"}, {"gamma", "delta"}},
		writers: [2]string{"beta", "delta"},
		move:    "delta", moveTo: "198.18.0.53",
	})
}

// joinAllOthers makes every node join every other by host name (as the
// README shows).
func joinAllOthers(name string) []string {
	var out []string
	for _, o := range healNames {
		if o != name {
			out = append(out, healSeed(o))
		}
	}
	return out
}

func runHeal(t *testing.T, sc healScenario) {
	l := newInternetLab(t)
	for i, name := range healNames {
		l.ns[name] = l.lab.Host(l.inet, name, fmt.Sprintf("198.18.0.%d", 40+i))
		l.addNode(name, false, l.secretFile).join = sc.join(name)
	}
	l.writeHealHosts()
	l.start()

	cross := func(f func(x, y string)) {
		for _, x := range sc.sides[0] {
			for _, y := range sc.sides[1] {
				f(x, y)
			}
		}
	}
	split := func(x, y string) { l.lab.Partition(l.ns[x], l.ns[y]) }
	heal := func(x, y string) { l.lab.Heal(l.ns[x], l.ns[y]) }
	cross(split)
	splitAt := time.Now()
	waitEvery(t, 60*time.Second, time.Second, "each side sees the other gone", func() error { return l.splitHolds(sc.sides) })
	t.Logf("split seen by every node after %v", time.Since(splitAt).Round(time.Millisecond))

	users := [2]string{"left" + sc.writers[0], "right" + sc.writers[1]}
	for i, w := range sc.writers {
		if err := l.nodes[w].addUser(users[i], healPass); err != nil {
			t.Fatalf("adding %s on %s during the split: %v", users[i], w, err)
		}
	}

	moved := sc.move == ""
	for time.Since(splitAt) < healSplit {
		if err := l.splitHolds(sc.sides); err != nil {
			t.Fatalf("the split leaked after %v: %v", time.Since(splitAt).Round(time.Second), err)
		}
		if !moved && time.Since(splitAt) > healSplit/2 {
			l.moveHealNode(sc.move, sc.moveTo, func(f func(x, y string)) {
				cross(func(x, y string) {
					if x == sc.move || y == sc.move {
						f(x, y)
					}
				})
			}, split, heal)
			moved = true
		}
		time.Sleep(time.Second) // the split's duration is the scenario, not a synchronisation
	}

	cross(heal)
	healAt := time.Now()
	waitEvery(t, healBound, 250*time.Millisecond, "the circle merged", func() error {
		var bad []string
		for _, name := range healNames {
			st, err := l.nodes[name].status()
			if err != nil {
				return err
			}
			if got := st.alive(); strings.Join(got, ",") != "alpha,beta,delta,gamma" {
				bad = append(bad, fmt.Sprintf("%s sees %v alive", name, got))
			}
			if st.Accounts != 2 {
				bad = append(bad, fmt.Sprintf("%s holds %d accounts", name, st.Accounts))
			}
		}
		if len(bad) > 0 {
			return fmt.Errorf("%s", strings.Join(bad, "; "))
		}
		return nil
	})
	t.Logf("merged %v after the network returned", time.Since(healAt).Round(time.Millisecond))

	// Both accounts log in on every node (they are whole, not just counted).
	for _, name := range healNames {
		web := l.nodes[name].localWeb()
		for _, u := range users {
			loginOnce(t, web, name, u, healPass)
		}
	}
}

// writeHealHosts gives every node's namespace the hosts file NAME.home.arpa
// -> current address of NAME.
func (l *natLab) writeHealHosts() {
	entries := map[string]netip.Addr{}
	for _, name := range healNames {
		entries[name+".home.arpa"] = l.ns[name].Addr
	}
	for _, name := range healNames {
		l.ns[name].SetHosts(entries)
	}
}

// moveHealNode changes name's address to addr while it stays cut off from
// the other side: netlab's partitions name addresses, so the node's
// partitions are healed and set again for the new address, behind a total
// loss of its outgoing packets so that nothing crosses meanwhile.
func (l *natLab) moveHealNode(name, addr string, itsPairs func(func(x, y string)), split, heal func(x, y string)) {
	l.t.Helper()
	n := l.ns[name]
	old := n.Addr
	l.lab.Loss(n, 1)
	itsPairs(heal)
	n.SetAddr(addr)
	itsPairs(split)
	l.lab.Loss(n, 0)
	l.writeHealHosts()
	l.t.Logf("%s moved from %s to %s", name, old, addr)
}

// splitHolds reports an error if a node sees a node of the other side
// alive or suspect.
func (l *natLab) splitHolds(sides [2][]string) error {
	side := map[string]int{}
	for i, s := range sides {
		for _, name := range s {
			side[name] = i
		}
	}
	var bad []string
	for i, s := range sides {
		for _, name := range s {
			st, err := l.nodes[name].status()
			if err != nil {
				return err
			}
			for _, m := range st.Members {
				if j, ok := side[m.Name]; ok && j != i && (m.State == "alive" || m.State == "suspect") {
					bad = append(bad, fmt.Sprintf("%s sees %s %s", name, m.Name, m.State))
				}
			}
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("%s", strings.Join(bad, "; "))
	}
	return nil
}
