package replicator

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestSingleNodeCRUD(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "solo"))
	ctx := ctxT(t)
	if n.Name() != "solo" {
		t.Fatalf("Name = %q", n.Name())
	}
	if _, err := n.Get("b", "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get absent: %v", err)
	}
	for i, k := range []string{"b/2", "a/1", "b/1", "c"} {
		if err := n.Put(ctx, "files", k, []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	r, err := n.Get("files", "a/1")
	if err != nil || string(r.Value) != "1" || r.Version.Node != "solo" || r.Deleted || r.Bucket != "files" || r.Key != "a/1" {
		t.Fatalf("Get = %+v, %v", r, err)
	}
	list, err := n.List("files", "b/")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, r := range list {
		keys = append(keys, r.Key)
	}
	if !slices.Equal(keys, []string{"b/1", "b/2"}) {
		t.Fatalf("List = %v", keys)
	}
	if all, _ := n.List("files", ""); len(all) != 4 {
		t.Fatalf("List all = %d records", len(all))
	}
	if none, err := n.List("nothing", ""); err != nil || len(none) != 0 {
		t.Fatalf("List of an absent bucket: %v %v", none, err)
	}

	// Overwrite: a higher version.
	if err := n.Put(ctx, "files", "c", []byte("new")); err != nil {
		t.Fatal(err)
	}
	r2, _ := n.Get("files", "c")
	if string(r2.Value) != "new" || r2.Version.Compare(r.Version) <= 0 {
		t.Fatalf("overwrite: %+v", r2)
	}

	// Delete: tombstone, hidden from Get and List, counted in Stats.
	if err := n.Delete(ctx, "files", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Get("files", "c"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get deleted: %v", err)
	}
	if all, _ := n.List("files", ""); len(all) != 3 {
		t.Fatalf("List after delete = %d records", len(all))
	}
	st := n.Stats()
	if st.Records != 3 || st.Tombstones != 1 || st.Buckets != 1 || st.AliveMembers != 1 {
		t.Fatalf("Stats = %+v", st)
	}
	if err := n.PutAsync("files", "c", []byte("again")); err != nil || !valueIs(n, "files", "c", "again") {
		t.Fatalf("PutAsync after delete: %v", err)
	}
	if err := n.DeleteAsync("files", "c"); err != nil || !absent(n, "files", "c") {
		t.Fatalf("DeleteAsync: %v", err)
	}
	if ms := n.Members(); len(ms) != 1 || ms[0].Name != "solo" || ms[0].State != StateAlive || ms[0].Addr != n.Addr() {
		t.Fatalf("Members = %+v", ms)
	}

	// Close is idempotent; calls after it fail with ErrClosed.
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := n.Put(ctx, "files", "x", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Put after Close: %v", err)
	}
	if _, err := n.Get("files", "a/1"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Get after Close: %v", err)
	}
	if _, err := n.List("files", ""); !errors.Is(err, ErrClosed) {
		t.Fatalf("List after Close: %v", err)
	}
}

func TestFirstWriterWinsLocal(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "solo"))
	ctx := ctxT(t)
	if err := n.Put(ctx, "fww", "alice", []byte("id1")); err != nil {
		t.Fatal(err)
	}
	if err := n.Put(ctx, "fww", "alice", []byte("id2")); err != nil {
		t.Fatal(err)
	}
	if !valueIs(n, "fww", "alice", "id1") {
		t.Fatal("a later live write replaced the first in a first-writer-wins bucket")
	}
	if err := n.Delete(ctx, "fww", "alice"); err != nil {
		t.Fatal(err)
	}
	if err := n.Put(ctx, "fww", "alice", []byte("id3")); err != nil {
		t.Fatal(err)
	}
	if !valueIs(n, "fww", "alice", "id3") {
		t.Fatal("a write after a delete did not take the key")
	}
}

func TestRestartPersistence(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir, "p")
	n, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	for i := range 50 {
		if err := n.Put(ctx, "b", fmt.Sprintf("k%02d", i), []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.Delete(ctx, "b", "k07"); err != nil {
		t.Fatal(err)
	}
	last, _ := n.Get("b", "k49")
	n.mu.Lock()
	clockBefore := n.clock.last
	n.mu.Unlock()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}

	// The wall clock of the restarted node lags: the HLC must still move on.
	cfg.BindAddr = "127.0.0.1:0"
	n2 := open(t, cfg)
	n2.mu.Lock()
	if n2.clock.last < clockBefore {
		t.Errorf("clock after restart %x < before %x", n2.clock.last, clockBefore)
	}
	n2.clock.now = func() time.Time { return time.UnixMilli(0) }
	n2.mu.Unlock()
	if st := n2.Stats(); st.Records != 49 || st.Tombstones != 1 {
		t.Fatalf("after restart: %+v", st)
	}
	if !valueIs(n2, "b", "k42", "42") || !absent(n2, "b", "k07") {
		t.Fatal("records lost across restart")
	}
	if err := n2.Put(ctx, "b", "k49", []byte("new")); err != nil {
		t.Fatal(err)
	}
	r, _ := n2.Get("b", "k49")
	if r.Version.Compare(last.Version) <= 0 || string(r.Value) != "new" {
		t.Fatalf("version after restart %v not above %v", r.Version, last.Version)
	}

	// A second Open of the same data dir fails instead of corrupting it.
	cfg.Name = "other"
	if _, err := Open(cfg); err == nil {
		t.Fatal("second Open of a data dir in use succeeded")
	}
}

func TestWatchLocal(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "solo"))
	ctx := ctxT(t)
	var mu sync.Mutex
	var got []string
	running := 0
	cancel := n.Watch("w", func(r Record) {
		mu.Lock()
		running++
		if running > 1 {
			t.Error("callbacks ran concurrently")
		}
		got = append(got, fmt.Sprintf("%s=%s/%v", r.Key, r.Value, r.Deleted))
		mu.Unlock()
		// Calling the node from a callback must not deadlock.
		if _, err := n.Get("w", r.Key); err != nil && !errors.Is(err, ErrNotFound) {
			t.Error(err)
		}
		mu.Lock()
		running--
		mu.Unlock()
	})
	other := n.Watch("other", func(Record) { t.Error("watch of another bucket called") })
	defer other()
	n.Put(ctx, "w", "a", []byte("1"))
	n.Put(ctx, "w", "a", []byte("2"))
	n.Delete(ctx, "w", "a")
	n.PutAsync("w", "b", []byte("3"))
	want := []string{"a=1/false", "a=2/false", "a=/true", "b=3/false"}
	waitFor(t, 5*time.Second, "watch events", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) >= len(want)
	})
	mu.Lock()
	if !slices.Equal(got, want) {
		t.Errorf("events = %v, want %v", got, want)
	}
	mu.Unlock()
	cancel()
	cancel() // idempotent
	n.Put(ctx, "w", "c", []byte("x"))
	// A watcher registered after the write above is called for the next one
	// only, which proves the earlier event was processed (and skipped).
	done := make(chan struct{})
	c2 := n.Watch("w", func(r Record) {
		if r.Key == "d" {
			close(done)
		}
	})
	defer c2()
	n.Put(ctx, "w", "d", nil)
	<-done
	mu.Lock()
	defer mu.Unlock()
	if len(got) != len(want) {
		t.Errorf("cancelled watcher was called: %v", got)
	}
}

func TestRemoteRecordAdvancesClock(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir, "solo")
	n, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Ahead, but within the maximum skew (further ahead is refused: skew_test.go).
	future := uint64(time.Now().Add(30*time.Second).UnixMilli()) << 16
	if err := n.applyRemote([]Record{{Bucket: "b", Key: "remote", Value: []byte("r"), Version: Version{Time: future, Node: "fast"}}}, false); err != nil {
		t.Fatal(err)
	}
	if err := n.Put(ctxT(t), "b", "local", []byte("l")); err != nil {
		t.Fatal(err)
	}
	r, _ := n.Get("b", "local")
	if r.Version.Time <= future {
		t.Fatalf("local version %v not after the remote %x", r.Version, future)
	}
	// A local overwrite of the remote record wins, and the clock survives a restart.
	if err := n.Put(ctxT(t), "b", "remote", []byte("mine")); err != nil || !valueIs(n, "b", "remote", "mine") {
		t.Fatalf("overwrite after a future remote record: %v", err)
	}
	n.Close()
	n2 := open(t, cfg)
	if err := n2.Put(ctxT(t), "b", "after", nil); err != nil {
		t.Fatal(err)
	}
	r2, _ := n2.Get("b", "after")
	if r2.Version.Time <= r.Version.Time {
		t.Fatalf("clock went back across restart: %v after %v", r2.Version, r.Version)
	}
}
