package replicator

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// unionMerge joins two comma-separated sets (sorted, no duplicates).
func unionMerge(a, b []byte) ([]byte, error) {
	if strings.HasPrefix(string(a), "bad") || strings.HasPrefix(string(b), "bad") {
		return nil, errors.New("not a set")
	}
	return []byte(strings.Join(setUnion(string(a), string(b)), ",")), nil
}

func setUnion(vals ...string) []string {
	var all []string
	for _, v := range vals {
		if v != "" {
			all = append(all, strings.Split(v, ",")...)
		}
	}
	slices.Sort(all)
	return slices.Compact(all)
}

// bareNode is a Node with a store and no network, for driving mergeLocked
// directly in any delivery order. Its clock is now.
type bareNode struct {
	*Node
	history []Record // every record that won here, in order (stale ones included)
}

func newBareNode(t *testing.T, dir, name string, now func() time.Time) *bareNode {
	t.Helper()
	db, err := openDB(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	log := slog.New(slog.DiscardHandler)
	n := &Node{
		cfg:   Config{Name: name, Now: now, Logger: log, Merge: map[string]MergeFunc{"set": unionMerge}},
		log:   log,
		db:    db,
		fww:   map[string]bool{},
		watch: newWatcher(log),
		ix:    index{},
		clock: hlc{now: now},
	}
	return &bareNode{Node: n}
}

// get returns the stored record of key (tombstones included).
func (b *bareNode) get(t *testing.T, key string) (Record, bool) {
	t.Helper()
	var r Record
	var ok bool
	if err := b.db.View(func(tx *bolt.Tx) error {
		var err error
		r, ok, err = getRecord(tx, "set", key)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return r, ok
}

// write stores a local change as Node.write does (without replicating).
func (b *bareNode) write(t *testing.T, key string, value []byte, deleted bool) {
	t.Helper()
	r, stored, err := b.writeLocal("set", key, value, deleted)
	if err != nil {
		t.Fatal(err)
	}
	if stored {
		b.history = append(b.history, r)
	}
}

// deliver applies recs as if received from a peer; it reports whether
// something changed.
func (b *bareNode) deliver(t *testing.T, recs ...Record) bool {
	t.Helper()
	recs = slices.Clone(recs)
	b.mu.Lock()
	w, err := b.mergeLocked(recs)
	b.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	b.history = append(b.history, w...)
	return len(w) > 0
}

// TestMergeConverges: random concurrent edits of a few keys on three
// nodes, with records delivered late, twice, out of order and in batches,
// end identical on every node once each node's current records reach the
// others; without deletes the value is the union of everything written
// (nothing lost). Clocks are skewed (one node 3 s behind, one 1 s ahead)
// so local versions do not follow the order of the edits.
func TestMergeConverges(t *testing.T) {
	for seed := range uint64(40) {
		for _, deletes := range []bool{false, true} {
			t.Run(fmt.Sprintf("seed%d/deletes=%v", seed, deletes), func(t *testing.T) {
				mergeScenario(t, seed, deletes)
			})
		}
	}
}

func mergeScenario(t *testing.T, seed uint64, deletes bool) {
	rng := rand.New(rand.NewPCG(seed, 8))
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var tick time.Duration // advanced at random: the shared "real" time
	dir := t.TempDir()
	var nodes []*bareNode
	for i, skew := range []time.Duration{0, -3 * time.Second, time.Second} {
		nodes = append(nodes, newBareNode(t, dir, fmt.Sprintf("n%d", i), func() time.Time { return base.Add(tick + skew) }))
	}
	keys := []string{"k0", "k1", "k2"}
	written := map[string][]string{}
	for step := range 300 {
		tick += time.Duration(rng.IntN(40)) * time.Millisecond
		n := nodes[rng.IntN(len(nodes))]
		key := keys[rng.IntN(len(keys))]
		switch op := rng.IntN(10); {
		case op < 4: // read-modify-write
			elem := fmt.Sprintf("%s-%d", n.cfg.Name, step)
			cur, ok := n.get(t, key)
			old := ""
			if ok && !cur.Deleted {
				old = string(cur.Value)
			}
			n.write(t, key, []byte(strings.Join(setUnion(old, elem), ",")), false)
			written[key] = append(written[key], elem)
		case op < 5: // blind write of one element
			elem := fmt.Sprintf("%s-%d", n.cfg.Name, step)
			n.write(t, key, []byte(elem), false)
			written[key] = append(written[key], elem)
		case op < 6 && deletes:
			n.write(t, key, nil, true)
		default: // deliver some record another node once held
			from := nodes[rng.IntN(len(nodes))]
			if from == n || len(from.history) == 0 {
				continue
			}
			batch := make([]Record, 1+rng.IntN(3))
			for i := range batch {
				batch[i] = from.history[rng.IntN(len(from.history))]
			}
			n.deliver(t, batch...)
		}
	}
	// The heal: current records go everywhere until nothing changes.
	quiet := false
	for round := 0; round < 20 && !quiet; round++ {
		quiet = true
		for _, from := range nodes {
			for _, to := range nodes {
				if from == to {
					continue
				}
				for _, key := range keys {
					if r, ok := from.get(t, key); ok && to.deliver(t, r) {
						quiet = false
					}
				}
			}
		}
	}
	if !quiet {
		t.Fatal("still changing after 20 rounds of full exchange")
	}
	for _, key := range keys {
		want, wantOK := nodes[0].get(t, key)
		for _, n := range nodes[1:] {
			got, ok := n.get(t, key)
			if ok != wantOK || got.Version != want.Version || got.Deleted != want.Deleted || string(got.Value) != string(want.Value) {
				t.Fatalf("%s differs: %s has %+v, %s has %+v", key, nodes[0].cfg.Name, want, n.cfg.Name, got)
			}
		}
		if !deletes && len(written[key]) > 0 {
			if w := strings.Join(setUnion(written[key]...), ","); string(want.Value) != w {
				t.Errorf("%s = %q, want every element written: %q", key, want.Value, w)
			}
		}
	}
}

// TestMergeRules: equal joins keep the higher record, a different join gets
// a new version above both, tombstones stay last writer wins, and a merge
// error falls back to last writer wins.
func TestMergeRules(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	dir := t.TempDir()
	a := newBareNode(t, dir, "a", clock)
	// Versions of remote records: ms milliseconds after a's clock.
	ms0 := uint64(now.UnixMilli())
	rec := func(val string, ms uint64, node string) Record {
		return Record{Bucket: "set", Key: "k", Value: []byte(val), Version: Version{Time: (ms0 + ms) << 16, Node: node}}
	}
	a.deliver(t, rec("x", 10, "b"))
	// Lower version whose value is already included: nothing changes.
	if a.deliver(t, rec("x", 5, "c")) {
		t.Error("a lower record already included changed the store")
	}
	// Higher version that is the join: stored unchanged.
	a.deliver(t, rec("x,y", 20, "b"))
	if r, _ := a.get(t, "k"); r.Version != (Version{(ms0 + 20) << 16, "b"}) || string(r.Value) != "x,y" {
		t.Errorf("higher join not stored as is: %+v", r)
	}
	// Lower version with something new: the join under a new local version.
	a.deliver(t, rec("z", 15, "c"))
	r, _ := a.get(t, "k")
	if string(r.Value) != "x,y,z" || r.Version.Node != "a" || r.Version.Time <= (ms0+20)<<16 {
		t.Errorf("join of a lower record: %+v, want x,y,z under a new version of a", r)
	}
	// A local write goes through the same rule (a blind write keeps the rest).
	a.write(t, "k", []byte("w"), false)
	if r, _ := a.get(t, "k"); string(r.Value) != "w,x,y,z" {
		t.Errorf("local write: %q, want w,x,y,z", r.Value)
	}
	// Tombstones: last writer wins.
	cur, _ := a.get(t, "k")
	a.deliver(t, Record{Bucket: "set", Key: "k", Deleted: true, Version: Version{cur.Version.Time + 1, "b"}})
	if r, _ := a.get(t, "k"); !r.Deleted {
		t.Errorf("newer tombstone lost: %+v", r)
	}
	a.deliver(t, rec("v", 1000, "b"))
	if r, _ := a.get(t, "k"); r.Deleted || string(r.Value) != "v" {
		t.Errorf("newer write after a tombstone: %+v, want v alone", r)
	}
	// Merge error: the higher version wins.
	a.deliver(t, rec("bad", 2000, "c"))
	if r, _ := a.get(t, "k"); string(r.Value) != "bad" {
		t.Errorf("merge error: %q, want the higher record bad", r.Value)
	}
	a.deliver(t, rec("q", 1500, "c"))
	if r, _ := a.get(t, "k"); string(r.Value) != "bad" {
		t.Errorf("merge error with a lower record: %q, want bad kept", r.Value)
	}
}

// TestMergeConfig: a bucket cannot be both first-writer-wins and merged.
func TestMergeConfig(t *testing.T) {
	cfg := testConfig(t, t.TempDir(), "a")
	cfg.Merge = map[string]MergeFunc{"fww": unionMerge}
	if _, err := cfg.withDefaults(); !errors.Is(err, ErrInvalid) {
		t.Errorf("merge + first writer wins: %v, want ErrInvalid", err)
	}
	cfg.Merge = map[string]MergeFunc{"set": nil}
	if _, err := cfg.withDefaults(); !errors.Is(err, ErrInvalid) {
		t.Errorf("nil merge func: %v, want ErrInvalid", err)
	}
}

// TestMergeAcrossPartition: two nodes that edited a merge bucket apart end
// with the join after they meet, through gossip and anti-entropy.
func TestMergeAcrossPartition(t *testing.T) {
	dir := t.TempDir()
	ctx := ctxT(t)
	mod := func(c *Config) { c.Merge = map[string]MergeFunc{"set": unionMerge} }
	ca, cb := testConfig(t, dir, "a"), testConfig(t, dir, "b")
	mod(&ca)
	mod(&cb)
	a, b := open(t, ca), open(t, cb)
	for _, n := range []*Node{a, b} {
		for _, k := range []string{"k0", "k1"} {
			if err := n.Put(ctx, "set", k, []byte(n.Name())); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := b.ml.Load().Join([]string{a.Addr()}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*Node{a, b} {
		waitFor(t, 10*time.Second, "join on "+n.Name(), func() bool {
			return valueIs(n, "set", "k0", "a,b") && valueIs(n, "set", "k1", "a,b")
		})
	}
	waitFor(t, 10*time.Second, "same versions", func() bool {
		ra, _ := a.Get("set", "k0")
		rb, _ := b.Get("set", "k0")
		return ra.Version == rb.Version
	})
}
