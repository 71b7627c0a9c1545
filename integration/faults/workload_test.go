package faults

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"
)

// Workloads. Each runs in its own goroutine at a modest fixed rate against
// a random node (a node that is down gives "fail" ops: the request never
// left the driver), and records every operation in the history.
//
//   - registers: keys reg/r0..r4, put (a unique value per write), get,
//     delete.
//   - set: unique keys set/e<id>, added once, some deleted later.
//   - accounts: read-modify-writes from several nodes on the same accounts:
//     disable, enable, set password (a unique password per write), set groups
//     (a unique group per write).
//   - revocations: issue a session on X, revoke it on Y, verify it
//     everywhere until every node refuses it (staleness per node).
//   - locks: simulated ACME orders (faultnode's /lock/order): take one of
//     two certificate locks on a random node (replicator.Leases, one holder
//     per process as caddymodule.Storage), hold it for a random 2-6 s in the
//     CI set (2-60 s in the soak) renewing it every second, release it. The
//     node reports the hold interval as the holder saw it (Held plus the
//     renewals' results); checkLocks asserts that no two intervals of one
//     lock overlap.
type workloads uint

const (
	wRegisters workloads = 1 << iota
	wSet
	wAccounts
	wRevocations
	wLocks
	wAll = wRegisters | wSet | wAccounts | wRevocations | wLocks
	// wKV leaves the accounts out: scenarios aimed at the network, the
	// processes or the clocks use it, so that the account merge defect
	// (accounts/*) does not fail them too.
	wKV = wRegisters | wSet | wRevocations
)

const (
	regBucket  = "reg"
	setBucket  = "set"
	regKeys    = 5
	nAccounts  = 3
	opInterval = 250 * time.Millisecond // per worker: 4 ops/s
)

// account is a workload account with what the driver knows of it.
type account struct {
	id, username string
	passwords    []string // every password ever set (index = value)
}

// workers runs the workloads of one scenario.
type workers struct {
	c      *cluster
	kinds  workloads
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex // guards the following
	accounts []*account
	added    []string // set keys added ok and not yet picked for deletion
	tokens   []*token
	revAcct  string // the revocation workload's account id
	seq      int    // numbers unique values, keys and groups
	holds    []hold // lock hold intervals reported by the holders
	// lockHold is the range of an order's hold time (default 2-6 s).
	lockHold [2]time.Duration
	// onAck, if set, is called by the worker right after a register put
	// or set add was acknowledged, before its next operation (the
	// "kill right after the N-th ack" nemesis).
	onAck func(op Op)
}

// token is an issued session of the revocation workload.
type token struct {
	tok, sid, issuedOn string
	revoke             *Op                      // the revoke op, nil if none yet
	refused            map[string]time.Duration // node -> first refusal seen (since the start)
}

// setupWorkloads creates what the workloads need (accounts on alpha,
// replicated everywhere) and returns workers not yet started.
func setupWorkloads(c *cluster, kinds workloads) *workers {
	c.t.Helper()
	w := &workers{c: c, kinds: kinds}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	a := c.nodes[0]
	if kinds&wAccounts != 0 {
		for i := range nAccounts {
			acc := &account{username: fmt.Sprintf("user%d", i)}
			pw := fmt.Sprintf("initial-password-%d", i)
			op := c.hist.invoke("setup", "acct-create", a.name, acc.username, pw)
			var res struct{ Type, Error, ID string }
			if err := a.post("/acct/create", map[string]any{"username": acc.username, "password": pw, "groups": []string{"init"}}, &res); err != nil || res.Type != "ok" {
				c.t.Fatalf("creating %s on %s: %v %s", acc.username, a.name, err, res.Error)
			}
			c.hist.complete(op, "ok", "", res.ID)
			acc.id = res.ID
			acc.passwords = []string{pw}
			w.accounts = append(w.accounts, acc)
		}
	}
	if kinds&wRevocations != 0 {
		var res struct{ Type, Error, ID string }
		if err := a.post("/acct/create", map[string]any{"username": "revoker", "password": "revoker-password"}, &res); err != nil || res.Type != "ok" {
			c.t.Fatalf("creating the revocation account on %s: %v %s", a.name, err, res.Error)
		}
		w.revAcct = res.ID
	}
	ids := []string{w.revAcct}
	for _, acc := range w.accounts {
		ids = append(ids, acc.id)
	}
	waitFor(c.t, 30*time.Second, "workload accounts on every node", func() error {
		for _, n := range c.nodes {
			for _, id := range ids {
				if id == "" {
					continue
				}
				var p struct{ Found bool }
				if err := n.post("/acct/probe", map[string]any{"id": id}, &p); err != nil {
					return err
				}
				if !p.Found {
					return fmt.Errorf("account %s not on %s yet", id, n.name)
				}
			}
		}
		return nil
	})
	return w
}

// start runs the workload goroutines until stop.
func (w *workers) start() {
	run := func(name string, every time.Duration, fn func(r *rand.Rand, worker string)) {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			r := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
			t := time.NewTicker(every)
			defer t.Stop()
			for {
				select {
				case <-w.ctx.Done():
					return
				case <-t.C:
				}
				if w.ctx.Err() != nil {
					return // select picks at random when a tick is pending too
				}
				fn(r, name)
			}
		}()
	}
	if w.kinds&wRegisters != 0 {
		run("reg-1", opInterval, w.registerOp)
		run("reg-2", opInterval, w.registerOp)
	}
	if w.kinds&wSet != 0 {
		run("set-1", opInterval, w.setOp)
	}
	if w.kinds&wAccounts != 0 {
		run("acct-1", 2*opInterval, w.accountOp)
		run("acct-2", 2*opInterval, w.accountOp)
	}
	if w.kinds&wLocks != 0 {
		if w.lockHold[1] == 0 {
			w.lockHold = [2]time.Duration{2 * time.Second, 6 * time.Second}
		}
		for i := range 3 {
			run(fmt.Sprintf("lock-%d", i+1), opInterval, w.lockOp)
		}
	}
	if w.kinds&wRevocations != 0 {
		run("rev-1", 4*opInterval, w.revocationOp)
		run("verify", 250*time.Millisecond, func(*rand.Rand, string) { w.verifyRevoked() })
	}
}

// stop ends the workloads and waits for operations in flight.
func (w *workers) stop() {
	w.cancel()
	if w.kinds&wLocks != 0 {
		// Orders in progress end their holds now rather than after up to
		// a minute, so the checks after the heal start in time.
		for _, n := range w.c.nodes {
			if n.running() {
				n.post("/lock/finish", struct{}{}, nil)
			}
		}
	}
	w.wg.Wait()
}

func (w *workers) pick(r *rand.Rand) *fnode { return w.c.nodes[r.IntN(len(w.c.nodes))] }

// next returns a number no other write of the run uses.
func (w *workers) next() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.seq++
	return w.seq
}

// writeResult is the faultnode's answer to a write.
type writeResult struct {
	Type  string `json:"type"`
	Error string `json:"error"`
	ID    string `json:"id"`
	Token string `json:"token"`
	SID   string `json:"sid"`
}

// write runs one write through n's control API and records it.
func (w *workers) write(worker, f string, n *fnode, key, value, path string, body any) (*Op, writeResult) {
	op := w.c.hist.invoke(worker, f, n.name, key, value)
	var res writeResult
	err := n.post(path, body, &res)
	switch {
	case errors.Is(err, errNotSent):
		w.c.hist.complete(op, "fail", err.Error(), "")
	case err != nil:
		w.c.hist.complete(op, "info", err.Error(), "")
		res.Type = "info"
	default:
		w.c.hist.complete(op, res.Type, res.Error, "")
	}
	if err != nil {
		res.Type = op.Type
	}
	return op, res
}

func (w *workers) registerOp(r *rand.Rand, worker string) {
	n := w.pick(r)
	key := fmt.Sprintf("r%d", r.IntN(regKeys))
	switch x := r.IntN(10); {
	case x < 6:
		value := fmt.Sprintf("v%d", w.next())
		op := w.c.hist.invoke(worker, "put", n.name, key, value)
		var res writeResult
		err := n.post("/kv/put", map[string]string{"bucket": regBucket, "key": key, "value": value}, &res)
		w.finish(op, err, res)
	case x < 8:
		w.write(worker, "delete", n, key, "", "/kv/delete", map[string]string{"bucket": regBucket, "key": key})
	default:
		op := w.c.hist.invoke(worker, "get", n.name, key, "")
		var res struct {
			Type, Error, Value string
			Found              bool
		}
		err := n.post("/kv/get", map[string]string{"bucket": regBucket, "key": key}, &res)
		got := "<absent>"
		if res.Found {
			got = res.Value
		}
		if err != nil {
			w.c.hist.complete(op, "fail", err.Error(), "")
		} else {
			w.c.hist.complete(op, res.Type, res.Error, got)
		}
	}
}

// finish completes op from a control call's error and result.
func (w *workers) finish(op *Op, err error, res writeResult) {
	switch {
	case errors.Is(err, errNotSent):
		w.c.hist.complete(op, "fail", err.Error(), "")
	case err != nil:
		w.c.hist.complete(op, "info", err.Error(), "")
	default:
		w.c.hist.complete(op, res.Type, res.Error, "")
	}
	w.mu.Lock()
	hook := w.onAck
	w.mu.Unlock()
	if hook != nil && op.Type == "ok" && (op.F == "put" || op.F == "add") {
		hook(*op)
	}
}

func (w *workers) setOp(r *rand.Rand, worker string) {
	n := w.pick(r)
	w.mu.Lock()
	del := len(w.added) > 0 && r.IntN(4) == 0
	var key string
	if del {
		i := r.IntN(len(w.added))
		key = w.added[i]
		w.added = append(w.added[:i], w.added[i+1:]...)
	}
	w.mu.Unlock()
	if del {
		w.write(worker, "delete", n, key, "", "/kv/delete", map[string]string{"bucket": setBucket, "key": key})
		return
	}
	key = fmt.Sprintf("e%d", w.next())
	op := w.c.hist.invoke(worker, "add", n.name, key, "1")
	var res writeResult
	err := n.post("/kv/put", map[string]string{"bucket": setBucket, "key": key, "value": "1"}, &res)
	w.finish(op, err, res)
	if err == nil && res.Type == "ok" {
		w.mu.Lock()
		w.added = append(w.added, key)
		w.mu.Unlock()
	}
}

func (w *workers) accountOp(r *rand.Rand, worker string) {
	n := w.pick(r)
	acc := w.accounts[r.IntN(len(w.accounts))]
	switch x := r.IntN(10); {
	case x < 3:
		w.write(worker, "disable", n, acc.id, "true", "/acct/disable", map[string]string{"id": acc.id})
	case x < 5:
		w.write(worker, "enable", n, acc.id, "false", "/acct/enable", map[string]string{"id": acc.id})
	case x < 8:
		w.mu.Lock()
		if len(acc.passwords) >= 12 { // bound the probe's hashing
			w.mu.Unlock()
			return
		}
		pw := fmt.Sprintf("password-%s-%d", acc.username, len(acc.passwords))
		acc.passwords = append(acc.passwords, pw)
		w.mu.Unlock()
		w.write(worker, "password", n, acc.id, pw, "/acct/password", map[string]string{"id": acc.id, "password": pw})
	default:
		g := fmt.Sprintf("g%d", w.next())
		op := w.c.hist.invoke(worker, "groups", n.name, acc.id, g)
		var res writeResult
		err := n.post("/acct/groups", map[string]any{"id": acc.id, "groups": []string{g}}, &res)
		w.finish(op, err, res)
	}
}

// revocationOp issues a session on one node and revokes it on another.
func (w *workers) revocationOp(r *rand.Rand, worker string) {
	x := w.pick(r)
	_, res := w.write(worker, "issue", x, w.revAcct, "", "/session/issue", map[string]string{"id": w.revAcct})
	if res.Type != "ok" {
		return
	}
	tk := &token{tok: res.Token, sid: res.SID, issuedOn: x.name, refused: map[string]time.Duration{}}
	w.mu.Lock()
	w.tokens = append(w.tokens, tk)
	w.mu.Unlock()
	y := w.pick(r)
	op, _ := w.write(worker, "revoke", y, res.SID, "", "/session/revoke", map[string]string{"sid": res.SID})
	w.mu.Lock()
	tk.revoke = op
	w.mu.Unlock()
	if op.Type == "ok" {
		w.verifyRevoked() // the first look right after the acknowledgement
	}
}

// verifyRevoked verifies every revoked token on every running node that
// has not refused it yet, and notes the first refusal per node.
func (w *workers) verifyRevoked() {
	w.mu.Lock()
	var todo []*token
	for _, tk := range w.tokens {
		if tk.revoke != nil && tk.revoke.Type != "invoke" && len(tk.refused) < len(w.c.nodes) {
			todo = append(todo, tk)
		}
	}
	w.mu.Unlock()
	for _, tk := range todo {
		for _, n := range w.c.nodes {
			w.mu.Lock()
			_, done := tk.refused[n.name]
			w.mu.Unlock()
			if done || !n.running() {
				continue
			}
			if valid, err := verifyOn(n, tk.tok); err == nil && !valid {
				at := w.c.hist.since()
				w.mu.Lock()
				if _, seen := tk.refused[n.name]; !seen {
					tk.refused[n.name] = at
				}
				w.mu.Unlock()
			}
		}
	}
}

// verifyOn asks n whether tok is valid; a refusal for any other reason
// than revocation (expired, invalid) counts as a refusal too, the reason
// is returned in err only for transport failures.
func verifyOn(n *fnode, tok string) (bool, error) {
	var res struct {
		Valid bool   `json:"valid"`
		Error string `json:"error"`
	}
	if err := n.post("/session/verify", map[string]string{"token": tok}, &res); err != nil {
		return false, err
	}
	if res.Error == "not_running" {
		return false, errors.New("identity not running")
	}
	return res.Valid, nil
}

// staleness summarises, per node, how long after a revocation was
// acknowledged the node still accepted the token (0 if it refused at the
// first check), over the tokens whose revocation was "ok".
func (w *workers) staleness() map[string][]time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[string][]time.Duration{}
	for _, tk := range w.tokens {
		if tk.revoke == nil || tk.revoke.Type != "ok" {
			continue
		}
		for node, at := range tk.refused {
			out[node] = append(out[node], max(0, at-tk.revoke.Complete))
		}
	}
	for _, v := range out {
		sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	}
	return out
}

// reportStaleness logs the revocation staleness figures per node.
func (w *workers) reportStaleness(t *testing.T) {
	for _, n := range w.c.nodes {
		v := w.staleness()[n.name]
		if len(v) == 0 {
			continue
		}
		t.Logf("revocation staleness on %s: n=%d p50=%v p99=%v max=%v", n.name, len(v),
			v[len(v)/2].Round(time.Millisecond), v[len(v)*99/100].Round(time.Millisecond), v[len(v)-1].Round(time.Millisecond))
	}
}

// lockNames are the locks the orders take (certmagic names its locks
// after the certificate).
var lockNames = []string{"issue_cert_a.circle.test", "issue_cert_b.circle.test"}

// hold is one hold interval of a lock as its holder reported it, in real
// time (every process runs on this machine).
type hold struct {
	op         *Op
	node, name string
	start, end time.Time
	lost       bool     // the holder saw its lease lost before the release
	renewFails []string // renewals that did not succeed
}

// lockOp runs one simulated ACME order on a random node and records its
// hold interval.
func (w *workers) lockOp(r *rand.Rand, worker string) {
	n := w.pick(r)
	name := lockNames[r.IntN(len(lockNames))]
	lo, hi := w.lockHold[0], w.lockHold[1]
	d := lo + time.Duration(r.Int64N(int64(hi-lo)+1))
	d = d.Round(100 * time.Millisecond)
	op := w.c.hist.invoke(worker, "lock", n.name, name, d.String())
	var res struct {
		Type     string `json:"type"`
		Error    string `json:"error"`
		StartNS  int64  `json:"start_ns"`
		EndNS    int64  `json:"end_ns"`
		Lost     bool   `json:"lost"`
		Renewals []struct {
			AtNS  int64  `json:"at_ns"`
			Error string `json:"error"`
		} `json:"renewals"`
	}
	err := n.post("/lock/order", map[string]string{"name": name, "wait": "5s", "hold": d.String(), "renew": "1s"}, &res)
	switch {
	case errors.Is(err, errNotSent):
		w.c.hist.complete(op, "fail", err.Error(), "")
		return
	case err != nil:
		// The node died or hung mid-order: the interval is unknown (a
		// killed holder stops working at once).
		w.c.hist.complete(op, "info", err.Error(), "")
		return
	}
	got := ""
	if res.Type == "ok" {
		got = fmt.Sprintf("held %.2fs-%.2fs", time.Unix(0, res.StartNS).Sub(w.c.hist.start).Seconds(), time.Unix(0, res.EndNS).Sub(w.c.hist.start).Seconds())
		if res.Lost {
			got += " (lost)"
		}
	}
	w.c.hist.complete(op, res.Type, res.Error, got)
	if res.Type != "ok" {
		return
	}
	h := hold{op: op, node: n.name, name: name, start: time.Unix(0, res.StartNS), end: time.Unix(0, res.EndNS), lost: res.Lost}
	for _, rn := range res.Renewals {
		if rn.Error != "" {
			h.renewFails = append(h.renewFails, rn.Error)
		}
	}
	w.mu.Lock()
	w.holds = append(w.holds, h)
	w.mu.Unlock()
}

// checkLocks: the hold intervals of one lock never overlap. docs/INTERNALS.md
// ("Locks") promises that with and without partitions and with any clock
// offset: only a side with a majority of the voters can take a lock. Its
// documented exceptions are a holder process paused past its validity, a
// split longer than ForgetAfter (24 h) and voters that disagree because a
// node's store never received the voter list (a wiped node, or a new node
// started cut off): an overlap involving a node wiped earlier in the run
// is reported in the log as that documented case, every other overlap is a
// violation.
func (w *workers) checkLocks(t *testing.T) []string {
	w.mu.Lock()
	holds := slices.Clone(w.holds)
	w.mu.Unlock()
	sort.Slice(holds, func(i, j int) bool { return holds[i].start.Before(holds[j].start) })
	var v []string
	lost, renewFails := 0, 0
	for i, a := range holds {
		if a.lost {
			lost++
		}
		renewFails += len(a.renewFails)
		for _, b := range holds[i+1:] {
			if b.name != a.name || !b.start.Before(a.end) {
				continue
			}
			at := func(x time.Time) float64 { return x.Sub(w.c.hist.start).Seconds() }
			msg := fmt.Sprintf("lock %s held twice: by %s from %.2fs to %.2fs (op %d) and by %s from %.2fs to %.2fs (op %d), overlapping %v",
				a.name, a.node, at(a.start), at(a.end), a.op.ID, b.node, at(b.start), at(b.end), b.op.ID,
				minTime(a.end, b.end).Sub(b.start).Round(time.Millisecond))
			if w.c.wipedBefore(a.node, b.start) || w.c.wipedBefore(b.node, b.start) {
				t.Logf("documented lock bound (a wiped node counts other voters): %s", msg)
				continue
			}
			v = append(v, msg)
		}
	}
	t.Logf("locks: %d holds, %d of them lost before release, %d failed renewals", len(holds), lost, renewFails)
	return v
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
