package faults

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"
)

// convergeBound is how long after the final heal every node must hold an
// identical full dump (issue 8: "identical full dumps ... on all nodes
// within 30 s of the final heal").
const convergeBound = 30 * time.Second

// scenario is a circle, workloads and a nemesis schedule.
type scenario struct {
	opts clusterOpts
	work workloads
	// pre and post are the workload's time before the nemesis starts and
	// after the final heal (default 3 s each; a negative post stops the
	// workload at the final heal).
	pre, post time.Duration
	// nemesis runs the faults; the runner heals everything after it.
	nemesis func(r *run)
	// lockHold is the range of the lock orders' hold times (default 2-6 s).
	lockHold [2]time.Duration
}

// run is a scenario in progress.
type run struct {
	t *testing.T
	c *cluster
	w *workers
}

// outcome is what a run measured, for the soak figures.
type outcome struct {
	ops        map[string]int // count per completion type
	converged  time.Duration  // after the final heal; -1 if not within the bound
	violations []string
	staleness  map[string][]time.Duration
	holds      int // lock hold intervals checked
}

// runScenario starts the circle, runs the workloads through the nemesis,
// heals, and checks.
func runScenario(t *testing.T, sc scenario) outcome {
	t.Helper()
	if sc.pre == 0 {
		sc.pre = 3 * time.Second
	}
	if sc.post == 0 {
		sc.post = 3 * time.Second
	}
	c := newCluster(t, sc.opts)
	w := setupWorkloads(c, sc.work)
	w.lockHold = sc.lockHold
	r := &run{t: t, c: c, w: w}
	w.start()
	stopped := false
	defer func() {
		if !stopped {
			w.stop()
		}
	}()
	pause(sc.pre)
	if sc.nemesis != nil {
		sc.nemesis(r)
	}
	c.healAll()
	healed := time.Now()
	c.hist.note("nemesis", "final heal")
	if sc.post > 0 {
		pause(sc.post)
	}
	w.stop()
	stopped = true
	return c.check(w, healed)
}

// check runs every checker after the final heal and reports violations.
func (c *cluster) check(w *workers, healed time.Time) outcome {
	t := c.t
	t.Helper()
	out := outcome{ops: map[string]int{}}
	ds, took, diff := c.awaitConvergence(healed, healed.Add(convergeBound))
	out.converged = took
	for _, name := range sortedKeys(ds) {
		if k := sortedKeys(ds[name].deferred); len(k) > 0 {
			t.Logf("%d keys wait for clocks to meet (kept aside by design; judged by the version that will win): %v", len(k), k[:min(len(k), 8)])
			break
		}
	}
	if diff != "" {
		out.violations = append(out.violations, fmt.Sprintf("dumps not identical on every node %v after the final heal: %s", convergeBound, diff))
	} else {
		t.Logf("identical dumps on every node %v after the final heal", took.Round(100*time.Millisecond))
	}
	ops := c.hist.snapshot()
	for _, op := range ops {
		out.ops[op.Type]++
	}
	for _, name := range sortedKeys(ds) {
		out.violations = append(out.violations, checkKV(ds[name], ops)...)
	}
	for _, n := range c.nodes {
		for _, acc := range w.accounts {
			out.violations = append(out.violations, checkAccount(n, acc, ops)...)
		}
	}
	w.verifyRevoked()
	out.violations = append(out.violations, w.checkRevoked()...)
	if w.kinds&wLocks != 0 {
		out.violations = append(out.violations, w.checkLocks(t)...)
		w.mu.Lock()
		out.holds = len(w.holds)
		w.mu.Unlock()
	}
	for _, s := range c.crashes() {
		out.violations = append(out.violations, "node crashed: "+s)
	}
	out.staleness = w.staleness()
	w.reportStaleness(t)
	t.Logf("history: %d ops (%d ok, %d info, %d fail)", len(ops), out.ops["ok"], out.ops["info"], out.ops["fail"])
	c.report(out.violations)
	return out
}

// checkRevoked: every session whose revocation was acknowledged is
// refused by every node once the circle has healed.
func (w *workers) checkRevoked() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var v []string
	for _, tk := range w.tokens {
		if tk.revoke == nil || tk.revoke.Type != "ok" {
			continue
		}
		var still []string
		for _, n := range w.c.nodes {
			if _, ok := tk.refused[n.name]; !ok {
				still = append(still, n.name)
			}
		}
		if len(still) > 0 {
			v = append(v, fmt.Sprintf("revoked session %s (issued on %s, revoked on %s at %.2fs) still valid after the heal on %v",
				tk.sid, tk.issuedOn, tk.revoke.Node, tk.revoke.Complete.Seconds(), still))
		}
	}
	return v
}

// report fails the test with the violations (the first 20 in the test
// log, all in verdict.txt).
func (c *cluster) report(violations []string) {
	c.t.Helper()
	if len(violations) == 0 {
		c.verdict("PASS")
		return
	}
	c.verdict("FAIL: %d violations", len(violations))
	for _, v := range violations {
		c.verdict("- %s", v)
	}
	shown := violations
	if len(shown) > 20 {
		shown = shown[:20]
	}
	c.t.Errorf("%d violations:\n- %s", len(violations), strings.Join(shown, "\n- "))
}

// fail reports one violation found by a scenario's own checks.
func (c *cluster) fail(format string, args ...any) {
	c.t.Helper()
	msg := fmt.Sprintf(format, args...)
	c.verdict("FAIL: %s", msg)
	c.t.Error(msg)
}

func sortedKeys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
