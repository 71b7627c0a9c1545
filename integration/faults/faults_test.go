package faults

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Durations of the nemeses in the CI set. The long split is longer than
// 60 s on purpose: memberlist stops gossiping to a dead node after
// GossipToTheDeadTime (30 s), which is where splits used not to heal; the
// issue's acceptance uses 75 s.
const (
	short   = 5 * time.Second
	medium  = 20 * time.Second
	longCut = 75 * time.Second
)

// TestFaults is the CI set: every nemesis once, short durations (and the
// 75 s splits the acceptance asks for), each scenario its own subtest so
// that the defects of issue 8 turn green one by one. Subtests run in
// parallel (go test's -parallel, GOMAXPROCS by default); each has its own
// namespaces and processes.
func TestFaults(t *testing.T) {
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T)
	}{
		// Splits that must heal, by seed kind (the first defect).
		{"heal/2+2-75s-ip-seeds", func(t *testing.T) { split22(t, ipSeeds, longCut, false) }},
		{"heal/2+2-75s-hostname-seeds", func(t *testing.T) { split22(t, hostSeeds, longCut, false) }},
		{"heal/first-node-without-join-alone-75s", firstNodeAlone},
		{"heal/2+2-75s-ip-changed-during-split", func(t *testing.T) { split22(t, hostSeeds, longCut, true) }},

		// Partitions of the usual shapes, short.
		{"partition/one-alone-5s", func(t *testing.T) { oneAlone(t, short) }},
		{"partition/2+2-20s-hostname-seeds", func(t *testing.T) { split22(t, hostSeeds, medium, false) }},
		{"partition/majority-minority-20s", majorityMinority},
		{"partition/bridge-20s", bridge},

		// Processes.
		{"kill/sigkill-restart-and-after-nth-ack", killRestart},
		{"wipe/data-dir-same-name", wipeNode},

		// Network quality.
		{"net/loss-5-30pct", loss},
		{"net/delay-100-1000ms", delay},

		// Clocks.
		{"clock/plus-10m-during-split-loses-no-ack", plus10m},
		{"clock/plus-10m-in-contact-loses-no-ack", plus10mInContact},
		{"clock/minus-2m-revoke-all", revokeAllSlowClock},
		{"clock/offsets-2m-1d-and-backward-step", clockOffsets},

		// Accounts.
		{"accounts/disable-vs-password-during-split", disableVsPassword},
		{"accounts/read-modify-write-under-partitions", accountsUnderPartitions},

		// Locks, garbage collection, a mixed-version circle.
		{"locks/orders-through-partitions-clocks-and-kill", lockOrders},
		{"gc/node-returns-after-horizon", returnAfterHorizon(true)},
		{"gc/node-returns-after-horizon-cut-before-its-next-exchange", returnAfterHorizon(false)},
		{"upgrade/one-node-on-next-wire", nextWireNode},

		// Everything at once.
		{"combined/split-loss-delay-kill", combined},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t)
		})
	}
}

// split22 runs four nodes, cuts {alpha,beta} from {gamma,delta} for d
// and, with moveIP, gives delta a new address in the middle of the split.
func split22(t *testing.T, seeds seedKind, d time.Duration, moveIP bool) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 4, seeds: seeds},
		work: wKV,
		nemesis: func(r *run) {
			n := r.c.nodes
			r.c.partition(n[:2], n[2:])
			if !moveIP {
				pause(d)
				return
			}
			pause(d / 2)
			r.c.setAddr(n[3], "198.18.0.44")
			pause(d - d/2)
		},
	})
}

// firstNodeAlone: alpha has no join, beta and gamma joined it by host
// name; alpha's home is offline for 75 s.
func firstNodeAlone(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: hostSeeds, firstNoJoin: true},
		work: wKV,
		nemesis: func(r *run) {
			r.c.isolate(r.c.nodes[0])
			pause(longCut)
		},
	})
}

func oneAlone(t *testing.T, d time.Duration) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wKV,
		nemesis: func(r *run) {
			r.c.isolate(r.c.nodes[2])
			pause(d)
		},
	})
}

func majorityMinority(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 5, seeds: ipSeeds},
		work: wKV,
		nemesis: func(r *run) {
			n := r.c.nodes
			r.c.partition(n[:3], n[3:])
			pause(medium)
		},
	})
}

// bridge: alpha and gamma cannot reach each other, beta reaches both.
func bridge(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wKV,
		nemesis: func(r *run) {
			n := r.c.nodes
			r.c.cut(n[0], n[2])
			r.c.hist.note("nemesis", "bridge: alpha and gamma cut, beta reaches both")
			pause(medium)
		},
	})
}

// killRestart SIGKILLs a node right after it acknowledged the 20th write,
// then kills and restarts nodes in turn.
func killRestart(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 4, seeds: ipSeeds},
		work: wKV,
		nemesis: func(r *run) {
			var acks atomic.Int64
			var victim atomic.Pointer[fnode]
			var once sync.Once
			killed := make(chan struct{})
			r.w.mu.Lock()
			r.w.onAck = func(op Op) {
				if acks.Add(1) < 20 {
					return
				}
				once.Do(func() {
					n := r.c.node(op.Node)
					r.c.hist.note("nemesis", fmt.Sprintf("op %d (%s %s) acknowledged by %s: kill it now", op.ID, op.F, op.Key, n.name))
					r.c.kill(n)
					victim.Store(n)
					close(killed)
				})
			}
			r.w.mu.Unlock()
			select {
			case <-killed:
			case <-time.After(30 * time.Second):
				r.t.Fatal("no 20 acknowledged writes within 30 s")
			}
			pause(2 * time.Second)
			r.c.restart(victim.Load())
			for i := range 3 {
				n := r.c.nodes[(i+1)%len(r.c.nodes)]
				r.c.kill(n)
				pause(3 * time.Second)
				r.c.restart(n)
				pause(2 * time.Second)
			}
		},
	})
}

// wipeNode deletes beta's data dir and brings it back under the same name.
func wipeNode(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wKV,
		pre:  6 * time.Second,
		nemesis: func(r *run) {
			r.c.wipe(r.c.nodes[1])
			pause(short)
		},
	})
}

func loss(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wKV,
		nemesis: func(r *run) {
			r.c.loss(0.05, r.c.nodes...)
			pause(10 * time.Second)
			r.c.loss(0.30, r.c.nodes[:2]...)
			pause(10 * time.Second)
		},
	})
}

func delay(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wKV,
		nemesis: func(r *run) {
			r.c.delay(100*time.Millisecond, r.c.nodes...)
			pause(10 * time.Second)
			r.c.delay(0, r.c.nodes...)
			r.c.delay(time.Second, r.c.nodes[2])
			pause(10 * time.Second)
		},
	})
}

// plus10m: gamma, cut off, jumps 10 minutes ahead; both sides keep
// writing the same registers. Writes acknowledged on alpha and beta after
// gamma's must not lose to gamma's only because its clock is fast.
func plus10m(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wRegisters | wSet,
		nemesis: func(r *run) {
			a, g := r.c.nodes[0], r.c.nodes[2]
			r.c.isolate(g)
			r.c.setClock(g, 10*time.Minute)
			// Besides the random workload, one write certainly ordered:
			// gamma's, acknowledged once gamma knows it is alone, then
			// alpha's.
			waitFor(r.t, medium, "gamma alone", func() error { return seesOthersDown(g) })
			put := func(n *fnode, v string) {
				if _, res := r.w.write("pinned", "put", n, "r-skew", v, "/kv/put", map[string]string{"bucket": regBucket, "key": "r-skew", "value": v}); res.Type != "ok" {
					r.t.Fatalf("put on %s: %s %s", n.name, res.Type, res.Error)
				}
			}
			put(g, "written-on-fast-gamma")
			// A second later: far less than gamma's 10 minutes, far more
			// than the error of gamma's estimate of the circle's time
			// (half a probe round trip); two writes on two nodes a few
			// milliseconds apart are ordered by clocks that agree only
			// that closely, which is last-writer-wins' documented limit.
			pause(time.Second)
			put(a, "written-later-on-alpha")
			pause(short)
		},
	})
}

// plus10mInContact is the acceptance of issue 8 for clocks: one node 10
// minutes fast while it is in contact with the others. Once it measured
// the others it versions its writes by the circle's time (before that they
// are refused by the others: not acknowledged, "info"); no acknowledged
// write is lost, and the others measure its offset (shown in status).
func plus10mInContact(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wKV,
		nemesis: func(r *run) {
			a, g := r.c.nodes[0], r.c.nodes[2]
			r.c.setClock(g, 10*time.Minute)
			waitFor(r.t, medium, "alpha measures gamma's offset", func() error {
				var ms []struct {
					Name          string
					ClockOffset   time.Duration
					ClockMeasured bool
				}
				if err := a.get("/members", &ms); err != nil {
					return err
				}
				for _, m := range ms {
					if m.Name == g.name && m.ClockMeasured && (m.ClockOffset-10*time.Minute).Abs() < 5*time.Second {
						return nil
					}
				}
				return fmt.Errorf("gamma's offset not measured on alpha yet: %+v", ms)
			})
			pause(medium)
		},
	})
}

// seesOthersDown returns nil once n sees every other node dead or left
// (neither alive nor suspect), so that its writes need nobody's
// acknowledgement.
func seesOthersDown(n *fnode) error {
	var ms []member
	if err := n.get("/members", &ms); err != nil {
		return err
	}
	for _, m := range ms {
		if m.Name != n.name && (m.State == "alive" || m.State == "suspect") {
			return fmt.Errorf("%s sees %s %s", n.name, m.Name, m.State)
		}
	}
	return nil
}

// clockOffsets: ±2 min and +1 day offsets, then a backward step of the
// +1 day node while it runs.
func clockOffsets(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wKV,
		nemesis: func(r *run) {
			n := r.c.nodes
			r.c.setClock(n[0], 2*time.Minute)
			r.c.setClock(n[1], -2*time.Minute)
			pause(8 * time.Second)
			r.c.setClock(n[2], 24*time.Hour)
			pause(8 * time.Second)
			r.c.setClock(n[2], -time.Minute) // a backward step of a day and a minute
			pause(8 * time.Second)
		},
	})
}

// revokeAllSlowClock: "log out everywhere" on a node whose clock is 2
// minutes slow must still revoke a session issued a moment before on
// another node.
func revokeAllSlowClock(t *testing.T) {
	c := newCluster(t, clusterOpts{nodes: 3, seeds: ipSeeds})
	w := setupWorkloads(c, wRevocations)
	a, g := c.nodes[0], c.nodes[2]
	c.setClock(g, -2*time.Minute)
	_, res := w.write("carol", "issue", a, w.revAcct, "", "/session/issue", map[string]string{"id": w.revAcct})
	if res.Type != "ok" {
		t.Fatalf("issuing a session on %s: %s %s", a.name, res.Type, res.Error)
	}
	op, rr := w.write("carol", "revoke-all", g, w.revAcct, "", "/session/revoke-all", map[string]string{"id": w.revAcct})
	if rr.Type != "ok" {
		t.Fatalf("revoke-all on %s: %s %s", g.name, rr.Type, rr.Error)
	}
	tk := &token{tok: res.Token, sid: res.SID, issuedOn: a.name, revoke: op, refused: map[string]time.Duration{}}
	w.mu.Lock()
	w.tokens = append(w.tokens, tk)
	w.mu.Unlock()
	deadline := time.Now().Add(convergeBound)
	for time.Now().Before(deadline) {
		w.verifyRevoked()
		w.mu.Lock()
		done := len(tk.refused) == len(c.nodes)
		w.mu.Unlock()
		if done {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	c.check(w, time.Now())
}

// disableVsPassword is the lost update: during a split an admin
// disables carol on one side; two seconds later carol's password is
// changed on the other side. After the heal carol must be disabled on
// every node, no password may log in, and her old session is refused.
func disableVsPassword(t *testing.T) {
	c := newCluster(t, clusterOpts{nodes: 4, seeds: ipSeeds})
	w := setupWorkloads(c, wAccounts)
	n := c.nodes
	carol := w.accounts[0]
	_, sess := w.write("carol", "issue", n[1], carol.id, "", "/session/issue", map[string]string{"id": carol.id})
	if sess.Type != "ok" {
		t.Fatalf("issuing carol's session: %s %s", sess.Type, sess.Error)
	}
	c.partition(n[:2], n[2:])
	pause(2 * time.Second)
	if _, r := w.write("admin", "disable", n[0], carol.id, "true", "/acct/disable", map[string]string{"id": carol.id}); r.Type != "ok" {
		t.Fatalf("disable on %s: %s %s", n[0].name, r.Type, r.Error)
	}
	pause(2 * time.Second)
	pw := "carols-new-password"
	w.mu.Lock()
	carol.passwords = append(carol.passwords, pw)
	w.mu.Unlock()
	if _, r := w.write("carol", "password", n[2], carol.id, pw, "/acct/password", map[string]string{"id": carol.id, "password": pw}); r.Type != "ok" {
		t.Fatalf("password change on %s: %s %s", n[2].name, r.Type, r.Error)
	}
	pause(short)
	c.healAll()
	healed := time.Now()
	c.check(w, healed)
	for _, node := range n {
		for _, p := range carol.passwords {
			var res struct {
				OK    bool   `json:"ok"`
				Error string `json:"error"`
			}
			if err := node.post("/acct/login", map[string]string{"username": carol.username, "password": p}, &res); err != nil {
				c.fail("login check on %s: %v", node.name, err)
			} else if res.OK {
				c.fail("disabled account %s logs in on %s with password %q after the heal", carol.username, node.name, p)
			}
		}
		if valid, err := verifyOn(node, sess.Token); err != nil {
			c.fail("verify on %s: %v", node.name, err)
		} else if valid {
			c.fail("the session of disabled account %s is still valid on %s after the heal", carol.username, node.name)
		}
	}
}

// accountsUnderPartitions: the random account workload (disable, enable,
// passwords, groups from several nodes) through two majority/minority
// splits.
func accountsUnderPartitions(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wAccounts | wRevocations,
		// Stop at the heal: later edits of a field would hide an earlier
		// edit of it that the merge lost.
		post: -1,
		nemesis: func(r *run) {
			n := r.c.nodes
			r.c.partition(n[:2], n[2:])
			pause(10 * time.Second)
			r.c.healNetwork()
			pause(3 * time.Second)
			r.c.partition(n[1:], n[:1])
			pause(10 * time.Second)
		},
	})
}

// combined: a 2+2 split with loss and delay on both sides and a node
// killed and restarted inside it.
func combined(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 4, seeds: ipSeeds},
		work: wAll,
		nemesis: func(r *run) {
			n := r.c.nodes
			r.c.partition(n[:2], n[2:])
			r.c.loss(0.10, n[0], n[3])
			r.c.delay(200*time.Millisecond, n[1], n[2])
			pause(5 * time.Second)
			r.c.kill(n[3])
			pause(3 * time.Second)
			r.c.restart(n[3])
			pause(7 * time.Second)
		},
	})
}

// lockOrders: simulated ACME orders on three nodes through a node cut off
// (it cannot take locks: no majority), clocks 10 minutes fast and slow
// (leases use no wall clock), the majority cut in two ways and a holder
// killed. checkLocks asserts no two holds of a lock overlap; the run must
// have taken locks on both sides of the faults to mean anything.
func lockOrders(t *testing.T) {
	var holdsBefore, holdsAfter int
	count := func(r *run) int {
		r.w.mu.Lock()
		defer r.w.mu.Unlock()
		return len(r.w.holds)
	}
	out := runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds},
		work: wLocks,
		pre:  6 * time.Second,
		nemesis: func(r *run) {
			n := r.c.nodes
			holdsBefore = count(r)
			r.c.isolate(n[2])
			pause(8 * time.Second)
			r.c.healNetwork()
			r.c.setClock(n[0], 10*time.Minute)
			r.c.setClock(n[1], -10*time.Minute)
			pause(5 * time.Second)
			r.c.isolate(n[0])
			pause(8 * time.Second)
			r.c.healNetwork()
			pause(3 * time.Second)
			r.c.kill(n[1])
			pause(4 * time.Second)
			r.c.restart(n[1])
			pause(4 * time.Second)
			holdsAfter = count(r)
		},
	})
	if holdsBefore < 1 || holdsAfter-holdsBefore < 3 {
		t.Errorf("too few locks taken to judge: %d before the faults, %d during them (history: %d ok ops)", holdsBefore, holdsAfter-holdsBefore, out.ops["ok"])
	}
}

// gcHorizon is the tombstone horizon of the garbage-collection scenario.
const gcHorizon = 20 * time.Second

// returnAfterHorizon: gamma is cut off for longer than the tombstone
// horizon while alpha deletes keys gamma holds and the others collect
// their tombstones; when gamma returns it must not bring them back, and
// what gamma wrote while alone must reach the others (docs/INTERNALS.md,
// garbage collection: a returning node drops what the circle deleted).
//
// With synced, the cut comes after gamma completed an exchange that
// covers the keys (the case the replicator's rule is exact for: "one node
// away longer than the horizon while the rest of the circle kept
// syncing"); without, right after the keys reached gamma by replication,
// before its next exchange (up to AntiEntropyInterval, 5 s, later), as
// happens to any record written in the last seconds before a node goes
// offline. No random workload: its keys would fall in that window too.
func returnAfterHorizon(synced bool) func(t *testing.T) {
	return func(t *testing.T) {
		runScenario(t, scenario{
			opts: clusterOpts{nodes: 3, seeds: ipSeeds, tombstoneHorizon: gcHorizon},
			nemesis: func(r *run) {
				a, b, g := r.c.nodes[0], r.c.nodes[1], r.c.nodes[2]
				put := func(n *fnode, k, v string) {
					if _, res := r.w.write("pinned", "put", n, k, v, "/kv/put", map[string]string{"bucket": regBucket, "key": k, "value": v}); res.Type != "ok" {
						r.t.Fatalf("put %s on %s: %s %s", k, n.name, res.Type, res.Error)
					}
				}
				var keys []string
				for i := range 5 {
					k := fmt.Sprintf("r-gc%d", i)
					keys = append(keys, k)
					put(a, k, "before-the-cut-"+k)
				}
				written := time.Now()
				waitFor(r.t, medium, "the pinned keys on gamma", func() error {
					for _, k := range keys {
						var res struct{ Found bool }
						if err := g.post("/kv/get", map[string]string{"bucket": regBucket, "key": k}, &res); err != nil || !res.Found {
							return fmt.Errorf("%s not on gamma yet (%v)", k, err)
						}
					}
					return nil
				})
				if synced {
					waitFor(r.t, medium, "an exchange of gamma's after the writes", func() error {
						var st struct {
							LastSync time.Time `json:"last_sync"`
						}
						if err := g.get("/stats", &st); err != nil {
							return err
						}
						if !st.LastSync.After(written) {
							return fmt.Errorf("gamma's last sync %v", st.LastSync)
						}
						return nil
					})
				}
				r.c.isolate(g)
				cut := time.Now()
				for _, k := range keys {
					if _, res := r.w.write("pinned", "delete", a, k, "", "/kv/delete", map[string]string{"bucket": regBucket, "key": k}); res.Type != "ok" {
						r.t.Fatalf("delete %s on alpha: %s %s", k, res.Type, res.Error)
					}
				}
				waitFor(r.t, medium, "gamma alone", func() error { return seesOthersDown(g) })
				put(g, "r-gc-alone", "written-on-gamma-alone")
				// The first collection pass runs a minute after a node starts,
				// then every horizon/24.
				waitFor(r.t, 100*time.Second, "the pinned tombstones collected on alpha and beta", func() error {
					for _, n := range []*fnode{a, b} {
						var d dump
						if err := n.get("/dump", &d); err != nil {
							return err
						}
						for _, rec := range d.Records {
							if rec.Bucket == regBucket && slices.Contains(keys, rec.Key) {
								return fmt.Errorf("%s/%s still on %s (deleted: %v)", rec.Bucket, rec.Key, n.name, rec.Deleted)
							}
						}
					}
					return nil
				})
				r.c.hist.note("nemesis", "the pinned tombstones are collected on alpha and beta")
				if away := time.Since(cut); away < gcHorizon+5*time.Second {
					pause(gcHorizon + 5*time.Second - away)
				}
			},
		})
	}
}

// nextWireNode: gamma runs the faultnode built with -tags circle_nextwire
// (it speaks the next wire version, with its optional fields and message
// types); every workload and checker must pass as in a circle of one
// version, through a short cut of gamma and a restart of alpha.
func nextWireNode(t *testing.T) {
	runScenario(t, scenario{
		opts: clusterOpts{nodes: 3, seeds: ipSeeds, nextWire: []string{"gamma"}},
		work: wAll,
		nemesis: func(r *run) {
			var h struct{ Wire string }
			if err := r.c.nodes[2].get("/health", &h); err != nil || h.Wire != "next" {
				r.t.Fatalf("gamma does not run the next-wire build: %q %v", h.Wire, err)
			}
			r.c.isolate(r.c.nodes[2])
			pause(short)
			r.c.healNetwork()
			pause(3 * time.Second)
			r.c.kill(r.c.nodes[0])
			pause(2 * time.Second)
			r.c.restart(r.c.nodes[0])
			pause(short)
		},
	})
}

// soakMinutes is the soak's time budget (CIRCLE_SOAK_MINUTES, default 20).
func soakMinutes() time.Duration {
	if m, err := strconv.Atoi(os.Getenv("CIRCLE_SOAK_MINUTES")); err == nil && m > 0 {
		return time.Duration(m) * time.Minute
	}
	return 20 * time.Minute
}

// TestSoak (CIRCLE_SOAK=1) runs long nemeses (splits longer than 60 s,
// combinations) one after the other until its budget is spent, and prints
// the figures for docs/RELIABILITY.md.
func TestSoak(t *testing.T) {
	if os.Getenv("CIRCLE_SOAK") != "1" {
		t.Skip("the long soak runs with CIRCLE_SOAK=1 (budget CIRCLE_SOAK_MINUTES, default 20)")
	}
	budget := soakMinutes()
	rounds := []struct {
		name string
		sc   scenario
	}{
		{"2+2-90s-hostname-seeds", scenario{opts: clusterOpts{nodes: 4, seeds: hostSeeds}, work: wAll,
			nemesis: func(r *run) { r.c.partition(r.c.nodes[:2], r.c.nodes[2:]); pause(90 * time.Second) }}},
		{"first-node-alone-90s", scenario{opts: clusterOpts{nodes: 3, seeds: hostSeeds, firstNoJoin: true}, work: wAll,
			nemesis: func(r *run) { r.c.isolate(r.c.nodes[0]); pause(90 * time.Second) }}},
		{"majority-minority-70s-loss-20pct", scenario{opts: clusterOpts{nodes: 5, seeds: ipSeeds}, work: wAll,
			nemesis: func(r *run) {
				r.c.partition(r.c.nodes[:3], r.c.nodes[3:])
				r.c.loss(0.2, r.c.nodes...)
				pause(70 * time.Second)
			}}},
		{"rolling-kills-and-delay-90s", scenario{opts: clusterOpts{nodes: 4, seeds: ipSeeds}, work: wAll,
			nemesis: func(r *run) {
				r.c.delay(300*time.Millisecond, r.c.nodes...)
				for i := range 6 {
					n := r.c.nodes[i%4]
					r.c.kill(n)
					pause(5 * time.Second)
					r.c.restart(n)
					pause(10 * time.Second)
				}
			}}},
		{"ip-change-alone-80s-clock-plus-2m", scenario{opts: clusterOpts{nodes: 4, seeds: hostSeeds}, work: wAll,
			nemesis: func(r *run) {
				d := r.c.nodes[3]
				r.c.isolate(d)
				r.c.setClock(d, 2*time.Minute)
				pause(40 * time.Second)
				r.c.setAddr(d, "198.18.0.45")
				pause(40 * time.Second)
			}}},
		{"next-wire-node-alone-70s", scenario{opts: clusterOpts{nodes: 4, seeds: hostSeeds, nextWire: []string{"delta"}}, work: wAll,
			nemesis: func(r *run) { r.c.isolate(r.c.nodes[3]); pause(70 * time.Second) }}},
		{"wipe-during-split-70s", scenario{opts: clusterOpts{nodes: 4, seeds: ipSeeds}, work: wAll,
			nemesis: func(r *run) {
				r.c.partition(r.c.nodes[:2], r.c.nodes[2:])
				pause(35 * time.Second)
				r.c.wipe(r.c.nodes[3])
				pause(35 * time.Second)
			}}},
	}
	start := time.Now()
	var table []string
	for i := 0; time.Since(start) < budget-3*time.Minute; i++ {
		rd := rounds[i%len(rounds)]
		rd.sc.lockHold = [2]time.Duration{2 * time.Second, 60 * time.Second} // ACME orders of 2-60 s
		var out outcome
		began := time.Now()
		ok := t.Run(fmt.Sprintf("%02d-%s", i, rd.name), func(t *testing.T) { out = runScenario(t, rd.sc) })
		took := time.Since(began).Round(time.Second)
		var st []string
		for _, node := range sortedKeys(out.staleness) {
			v := out.staleness[node]
			if len(v) > 0 {
				st = append(st, fmt.Sprintf("%s %v", node, v[len(v)-1].Round(10*time.Millisecond)))
			}
		}
		conv := "not within 30 s"
		if out.converged >= 0 {
			conv = out.converged.Round(100 * time.Millisecond).String()
		}
		table = append(table, fmt.Sprintf("| %s | %v | %v | %d / %d / %d | %d | %s | %d | %s |", rd.name, ok, took, out.ops["ok"], out.ops["info"],
			out.ops["fail"], out.holds, conv, len(out.violations), strings.Join(st, ", ")))
	}
	t.Logf("soak figures (%v):\n| round | passed | took | ops ok / info / fail | lock holds | identical dumps after heal | violations | worst revocation staleness per node |\n|---|---|---|---|---|---|---|---|\n%s",
		time.Since(start).Round(time.Second), strings.Join(table, "\n"))
}
