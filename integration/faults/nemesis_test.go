package faults

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"
)

// Nemeses: each action is noted in the history. healAll undoes every
// network fault and restarts the nodes that are down; clock offsets stay
// (a node's clock is not "healed" by the network coming back).

func names(ns []*fnode) string {
	var s []string
	for _, n := range ns {
		s = append(s, n.name)
	}
	return strings.Join(s, ",")
}

// partition cuts every pair of nodes that are in different groups.
func (c *cluster) partition(groups ...[]*fnode) {
	c.t.Helper()
	var desc []string
	for i, g := range groups {
		desc = append(desc, "{"+names(g)+"}")
		for _, h := range groups[i+1:] {
			for _, x := range g {
				for _, y := range h {
					c.cut(x, y)
				}
			}
		}
	}
	c.hist.note("nemesis", "partition "+strings.Join(desc, " | "))
}

// cut drops all traffic between x and y.
func (c *cluster) cut(x, y *fnode) {
	c.lab.Partition(x.ns, y.ns)
	c.mu.Lock()
	c.parts = append(c.parts, [2]*fnode{x, y})
	c.mu.Unlock()
}

// isolate cuts n off from every other node.
func (c *cluster) isolate(n *fnode) {
	c.t.Helper()
	var rest []*fnode
	for _, o := range c.nodes {
		if o != n {
			rest = append(rest, o)
		}
	}
	c.partition([]*fnode{n}, rest)
}

// healNetwork removes every partition, loss and delay.
func (c *cluster) healNetwork() {
	c.t.Helper()
	c.mu.Lock()
	parts := c.parts
	c.parts = nil
	c.mu.Unlock()
	for _, p := range parts {
		c.lab.Heal(p[0].ns, p[1].ns)
	}
	for _, n := range c.nodes {
		c.lab.Loss(n.ns, 0)
		c.lab.Delay(n.ns, 0)
	}
	c.hist.note("nemesis", "network healed (partitions, loss, delay removed)")
}

// healAll heals the network and restarts every node that is down.
func (c *cluster) healAll() {
	c.t.Helper()
	c.healNetwork()
	for _, n := range c.nodes {
		if !n.running() {
			c.restart(n)
		}
	}
}

// loss makes each packet n sends dropped with probability p.
func (c *cluster) loss(p float64, ns ...*fnode) {
	c.t.Helper()
	for _, n := range ns {
		c.lab.Loss(n.ns, p)
	}
	c.hist.note("nemesis", fmt.Sprintf("loss %.0f%% on %s", p*100, names(ns)))
}

// delay adds d to every packet arriving at each of ns.
func (c *cluster) delay(d time.Duration, ns ...*fnode) {
	c.t.Helper()
	for _, n := range ns {
		c.lab.Delay(n.ns, d)
	}
	c.hist.note("nemesis", fmt.Sprintf("delay %v on %s", d, names(ns)))
}

// setClock sets n's wall clock offset (kept across restarts).
func (c *cluster) setClock(n *fnode, off time.Duration) {
	c.t.Helper()
	n.mu.Lock()
	n.offset = off
	n.mu.Unlock()
	if n.running() {
		if err := n.post("/clock", map[string]string{"offset": off.String()}, nil); err != nil {
			c.t.Fatalf("setting %s's clock: %v", n.name, err)
		}
	}
	c.hist.note("nemesis", fmt.Sprintf("clock of %s offset %v", n.name, off))
}

// setAddr moves n to a new address and updates every hosts file.
func (c *cluster) setAddr(n *fnode, addr string) {
	c.t.Helper()
	old := n.addr()
	n.ns.SetAddr(addr)
	n.mu.Lock()
	n.ip = netip.MustParseAddr(addr)
	n.mu.Unlock()
	c.writeHosts()
	c.hist.note("nemesis", fmt.Sprintf("address of %s changed from %s to %s (hosts files updated)", n.name, old, addr))
}

// kill SIGKILLs n.
func (c *cluster) kill(n *fnode) {
	n.kill()
	c.hist.note("nemesis", "SIGKILL "+n.name)
}

// restart starts a killed node again on its data dir.
func (c *cluster) restart(n *fnode) {
	c.t.Helper()
	n.kill()
	n.launch()
	n.waitUp()
	c.hist.note("nemesis", "restarted "+n.name)
}

// wipe kills n, deletes its data dir and starts it again under the same
// name (a node restored from nothing).
func (c *cluster) wipe(n *fnode) {
	c.t.Helper()
	n.kill()
	if err := os.RemoveAll(n.dir); err != nil {
		c.t.Fatal(err)
	}
	c.hist.note("nemesis", "wiped the data dir of "+n.name)
	c.mu.Lock()
	if c.wiped == nil {
		c.wiped = map[string]time.Time{}
	}
	c.wiped[n.name] = time.Now()
	c.mu.Unlock()
	n.launch()
	n.waitUp()
	c.hist.note("nemesis", "restarted "+n.name+" with an empty data dir")
}

// pause lets the workloads run for d (a schedule, not a synchronisation:
// nothing waits for an event here).
func pause(d time.Duration) { time.Sleep(d) }

// wipedBefore reports whether node's data dir was wiped before t.
func (c *cluster) wipedBefore(node string, t time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	at, ok := c.wiped[node]
	return ok && at.Before(t)
}
